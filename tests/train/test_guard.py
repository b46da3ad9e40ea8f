"""The non-finite guard of every trainer (PPO's is in test_ppo_trainer.py): a non-finite step changes nothing,
is counted and logged with its rows, several in a row stop the job with one line; loss spikes counted."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import CotsafeError, models, parallel
from cotsafe_jax.data import synthetic as syn
from cotsafe_jax.train import guard as guard_lib, sft_trainer as st


def test_spikes_are_counted_against_the_running_median_and_mad(tmp_path):
  g = guard_lib.StepGuard(str(tmp_path), job="t", window=20, mads=6.0, min_history=10)
  rng = np.random.default_rng(0)
  losses = list(1.0 + 0.01 * rng.normal(size=30)) + [5.0] + list(1.0 + 0.01 * rng.normal(size=5))
  spikes = []
  for i, loss in enumerate(losses):
    h = np.asarray(g.history[-20:])
    want = len(h) >= 10 and loss > np.median(h) + 6 * np.median(np.abs(h - np.median(h)))
    spikes.append(g.observe(i + 1, finite=True, loss=loss)["guard/loss_spikes"])
    assert spikes[-1] == spikes[-2] + want if i else spikes[-1] == 0
  assert spikes[-1] == 1.0  # the 5.0 (and nothing else: the history holds 20 values near 1)


def test_run_of_nonfinite_steps_stops_and_a_finite_one_resets(tmp_path):
  g = guard_lib.StepGuard(str(tmp_path), job="sft_train", max_nonfinite_steps=2)
  g.observe(1, finite=False, loss=float("nan"), row_ids=["a", "b"])
  assert not g.must_stop
  g.observe(2, finite=True, loss=1.0)
  g.observe(3, finite=False, loss=float("inf"), row_ids=["c"])
  m = g.observe(4, finite=False, loss=float("nan"), row_ids=["d"])
  assert g.must_stop and m["guard/nonfinite_steps"] == 3.0
  err = str(g.error(4))
  assert err.startswith("cotsafe_jax: sft_train: 2 steps in a row") and "(steps 3-4" in err and "\n" not in err
  logged = [json.loads(l) for l in open(tmp_path / guard_lib.NONFINITE_LOG)]
  assert [r["step"] for r in logged] == [1, 3, 4] and logged[0]["row_ids"] == ["a", "b"]
  restored = guard_lib.StepGuard(str(tmp_path), job="sft_train", max_nonfinite_steps=2)
  restored.restore(g.state())
  assert restored.must_stop and restored.total == 3


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  return syn.write_task(syn.make_task(seed=0, n_train=32, n_eval=0), str(tmp_path_factory.mktemp("task")))


def test_sft_skips_nonfinite_steps_and_stops_after_a_run_of_them(tmp_path, task_files, monkeypatch):
  real_loss = st.sft_loss
  poison = {"on": False}

  def loss_with_nan(*args, **kw):  # a loss that is NaN while `poison` is on (read when the step is traced)
    loss, metrics = real_loss(*args, **kw)
    bad = jnp.where(args[2]["tokens_bt"][0, 0] >= 0, jnp.nan, 0.0) if poison["on"] else 0.0
    return loss + bad, {**metrics, "loss": metrics["loss"] + bad}

  monkeypatch.setattr(st, "sft_loss", loss_with_nan)
  cfg = models.tiny_config("qwen2", vocab_size=576)
  mesh = parallel.make_mesh()
  config = st.SFTConfig(max_len=64, batch_size=8, num_steps=4, learning_rate=2.5e-3, schedule="constant", seed=3)
  poison["on"] = True
  with pytest.raises(CotsafeError, match=r"sft_train: 2 steps in a row with non-finite losses or gradients"):
    st.sft_train(workdir=str(tmp_path), data=task_files["sft_safe"], config=config, model=cfg,
                 tokenizer_dir=task_files["tokenizer"], mesh=mesh, async_checkpoint=False, save_interval_steps=1,
                 max_nonfinite_steps=2)
  logged = [json.loads(l) for l in open(tmp_path / guard_lib.NONFINITE_LOG)]
  assert [r["step"] for r in logged] == [1, 2] and len(logged[0]["row_ids"]) == 8
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["guard/nonfinite_steps"] == 2.0 and rows[-1]["nonfinite"] == 1.0
  # the saved step-1 state is the initial params: the poisoned steps changed nothing
  from cotsafe_jax.train.checkpointing import Checkpointer
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == 1
  init = models.init_params(cfg.replace(param_dtype=jnp.float32), jax.random.key(config.seed), mesh=mesh)
  target = {"step": jnp.zeros((), jnp.int32), "params": init,
            "opt_state": jax.eval_shape(st.make_sft_optimizer(config, 4).init, init)}
  opt_sh = st.state_shardings(cfg.replace(param_dtype=jnp.float32), st.make_sft_optimizer(config, 4), mesh)["opt_state"]
  target["opt_state"] = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                     target["opt_state"], opt_sh)
  state, _, _ = ckpt.restore(1, target)
  ckpt.close()
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), state["params"], init))
