"""The PPO loop end to end on a tiny random policy: the reward rises, sharding does not change the maths,
and a run stopped by SIGTERM resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cotsafe_jax import CotsafeError, models, parallel
from cotsafe_jax.rewards.rules import TokenSetReward
from cotsafe_jax.rl import AdvantageConfig, PolicyLoss
from cotsafe_jax.rl.ppo import PPOConfig
from cotsafe_jax.train import ppo_trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "data", "tiny_tokenizer")
PROMPTS = os.path.join(ROOT, "data", "tiny_prompts.jsonl")
CFG = models.tiny_config("qwen2", vocab_size=640)
TARGET_IDS = tuple(range(100, 164))  # 10% of the vocabulary: a dense, easily learnable token reward


def _train(workdir, *, num_steps, mesh=None, estimator="gae", reward=None, **kw):
  ppo = PPOConfig(advantage=AdvantageConfig(estimator=estimator, group_size=kw.pop("group_size", 1)),
                  policy_loss=PolicyLoss(clip_high=0.28), kl_coef=0.01, epochs=2, num_minibatches=2)
  return T.train(workdir=str(workdir), policy=T.PolicySpec(config=CFG, tokenizer_dir=TOKENIZER),
                 reward=reward or TokenSetReward(token_ids=TARGET_IDS), prompts=PROMPTS, ppo=ppo,
                 rollout=T.RolloutConfig(max_prompt_len=48, max_new_tokens=16, **kw.pop("rollout", {})),
                 optim=T.OptimConfig(learning_rate=3e-3), num_steps=num_steps, prompts_per_step=8, mesh=mesh,
                 async_checkpoint=False, export_hf=False, **kw)


def test_mean_reward_rises_within_20_iterations(tmp_path):
  from cotsafe_jax.rollout import sampler
  traces = sampler._trace_count
  out = _train(tmp_path, num_steps=20, mesh=parallel.single_device_mesh())
  assert sampler._trace_count - traces <= 1  # at most one sampler compile for all 20 steps
  rewards = [h["reward/mean"] for h in out["history"]]
  first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
  print(f"reward/mean first 4 steps {first:.3f} -> last 4 steps {last:.3f}")
  assert last > 1.5 * first and last - first > 1.0, rewards


def _numeric(row):
  return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


def test_first_iteration_sharded_equals_single_device(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  one = _train(tmp_path / "one", num_steps=1, mesh=parallel.single_device_mesh())["history"][0]
  eight = _train(tmp_path / "eight", num_steps=1, mesh=parallel.make_mesh(data=2, fsdp=2, tensor=2))["history"][0]
  one, eight = _numeric(one), _numeric(eight)
  assert one.keys() == eight.keys()
  for k in one:
    assert abs(one[k] - eight[k]) <= 1e-4 * max(1.0, abs(one[k])), (k, one[k], eight[k])


def test_batch_sizes_must_divide(tmp_path):
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2) if jax.device_count() >= 8 else None
  with pytest.raises(CotsafeError, match="6 rows do not divide into num_minibatches=4"):
    T.check_batch_sizes(prompts_per_step=3, samples_per_prompt=2, ppo=PPOConfig(num_minibatches=4),
                        mesh=parallel.single_device_mesh())
  with pytest.raises(CotsafeError, match="minibatch of 8 rows does not divide into num_microbatches=3"):
    T.check_batch_sizes(prompts_per_step=8, samples_per_prompt=1, ppo=PPOConfig(num_microbatches=3),
                        mesh=parallel.single_device_mesh())
  if mesh is not None:
    with pytest.raises(CotsafeError, match=r"microbatch of 2 rows \(of 4 per step\) does not divide over the 4 "
                                           r"data x fsdp devices"):
      T.check_batch_sizes(prompts_per_step=4, samples_per_prompt=1, ppo=PPOConfig(num_minibatches=2), mesh=mesh)
  with pytest.raises(CotsafeError, match="group_size=2 must equal samples_per_prompt=4 for grpo"):
    T.check_batch_sizes(prompts_per_step=2, samples_per_prompt=4,
                        ppo=PPOConfig(advantage=AdvantageConfig(estimator="grpo", group_size=2)),
                        mesh=parallel.single_device_mesh())


@pytest.mark.parametrize("field,message", [
    (dict(truncate="right"), "RolloutConfig.truncate='right', expected 'left' or 'error'"),
    (dict(samples_per_prompt=0), "samples_per_prompt, max_prompt_len and max_new_tokens must be >= 1"),
    (dict(cache_phases=0), "RolloutConfig.cache_phases=0 \\(expected >= 1, or None for automatic\\)"),
])
def test_rollout_config_rejects_bad_values(field, message):
  with pytest.raises(CotsafeError, match=message):
    T.RolloutConfig(**field)


def test_long_prompts_cut_from_the_left_or_rejected_and_counted():
  tok = models.load_tokenizer(TOKENIZER)
  rows = [{"prompt": "short?", "kind": "benign", "id": "a"},
          {"prompt": "tom has 3 apples, buys 4, gives 2, finds 5 and loses 1. how many apples now?",
           "kind": "reasoning", "id": "long-1"}]
  full = tok(models.apply_chat_template(tok, rows[1]["prompt"]), add_special_tokens=False)["input_ids"]
  n = len(full) - 5
  tokens, mask, truncated = T.encode_prompts(tok, rows, max_prompt_len=n, truncate="left", pad_id=0)
  assert truncated == 1
  assert list(tokens[1]) == full[-n:] and mask[1].all()  # the end of the prompt (generation prompt) is kept
  assert not mask[0, 0] and mask[0, -1]  # left padding
  with pytest.raises(CotsafeError, match=f"prompt long-1: {len(full)} tokens > max_prompt_len={n}"):
    T.encode_prompts(tok, rows, max_prompt_len=n, truncate="error", pad_id=0)


def _launch(workdir, num_steps):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"),
         "--gin_file=gin/experiments/tiny_ppo_cpu.gin", f"--gin_param=ppo_train.num_steps={num_steps}",
         "--gin_param=ppo_train.prompts_per_step=8", "--gin_param=RolloutConfig.max_new_tokens=16",
         "--gin_param=ppo_train.save_interval_steps=1", f"--workdir={workdir}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_sigterm_then_rerun_resumes_exactly(tmp_path):
  straight = _launch(tmp_path / "straight", 4)
  out, err = straight.communicate(timeout=600)
  assert straight.returncode == 0, err

  stopped = _launch(tmp_path / "stopped", 4)
  deadline = time.time() + 600
  while time.time() < deadline:
    if os.path.exists(tmp_path / "stopped" / "metrics.jsonl") and len(_rows(tmp_path / "stopped")) >= 2:
      break
    time.sleep(0.02)
  stopped.send_signal(signal.SIGTERM)  # lands during step 3 (or right after step 2)
  out, err = stopped.communicate(timeout=600)
  assert stopped.returncode == 0, err
  logged = [r["step"] for r in _rows(tmp_path / "stopped")]
  assert logged[-1] in (2, 3) and "stopped early" in out
  saved = sorted(int(d) for d in os.listdir(tmp_path / "stopped" / "checkpoints") if d.isdigit())
  assert saved[-1] == logged[-1]  # the step in flight finished and was checkpointed

  resumed = _launch(tmp_path / "stopped", 4)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err
  a = [_numeric(r) for r in _rows(tmp_path / "straight")]
  b = [_numeric(r) for r in _rows(tmp_path / "stopped")]
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      if ra[k] is None:  # NaN (e.g. explained variance of constant returns) is written as null
        assert rb[k] is None, (ra["step"], k)
      else:
        assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)


def test_sampling_and_training_temperatures_must_agree(tmp_path):
  with pytest.raises(CotsafeError, match=r"RolloutConfig.temperature=0.6 but PPOConfig.temperature=1.0"):
    _train(tmp_path, num_steps=1, mesh=parallel.single_device_mesh(), rollout={"temperature": 0.6})


def test_logprob_mismatch_is_logged_and_top_p_is_importance_corrected(tmp_path):
  mesh = parallel.single_device_mesh()
  full = _train(tmp_path / "full", num_steps=1, mesh=mesh)["history"][0]
  top_p = _train(tmp_path / "top_p", num_steps=1, mesh=mesh, rollout={"top_p": 0.5})["history"][0]
  # unfiltered sampling: the sampler's and the trainer's log-probs are the same distribution's (numerics only)
  assert full["rollout/logprob_mismatch"] < 1e-4 and abs(full["rollout/tis_weight_mean"] - 1.0) < 1e-4
  # top-p: q = pi / Z_kept on the kept tokens, so log q - log pi = -log Z_kept > 0 and the weights pi / q < 1
  assert top_p["rollout/logprob_kl"] > 0.05 and top_p["rollout/tis_weight_mean"] < 0.97
  assert top_p["rollout/logprob_mismatch"] == pytest.approx(top_p["rollout/logprob_kl"], rel=1e-5)


class _NaNOnSteps:
  """A reward that is NaN on the given calls (1-based): what a broken reward model would hand the trainer."""

  def __init__(self, calls):
    self.calls, self.n, self.inner = set(calls), 0, TokenSetReward(token_ids=TARGET_IDS)

  def __call__(self, batch):
    self.n += 1
    out = self.inner(batch)
    return out.replace(values_bt=out.values_bt * np.nan) if self.n in self.calls else out


def test_nonfinite_steps_are_skipped_then_stop_the_run_with_the_last_checkpoint_good(tmp_path):
  mesh = parallel.single_device_mesh()
  out = _train(tmp_path / "one", num_steps=3, mesh=mesh, reward=_NaNOnSteps({2}), save_interval_steps=1)
  h = out["history"]
  assert [r["guard/skipped"] for r in h] == [0.0, 1.0, 0.0] and h[-1]["guard/nonfinite_steps"] == 1.0
  assert h[1]["update/nonfinite/policy"] == 1.0
  logged = [json.loads(l) for l in open(tmp_path / "one" / "nonfinite.jsonl")]
  assert logged[0]["step"] == 2 and len(logged[0]["row_ids"]) == 8 and logged[0]["row_ids"][0].startswith("train-")
  with pytest.raises(CotsafeError, match=r"ppo_train: 3 steps in a row with non-finite losses or gradients \(steps 2-4"):
    _train(tmp_path / "stop", num_steps=6, mesh=mesh, reward=_NaNOnSteps({2, 3, 4}), save_interval_steps=1)
  ckpt = T.Checkpointer(str(tmp_path / "stop" / "checkpoints"))
  assert ckpt.latest_step() == 3  # steps 2, 3 (skipped, params unchanged) saved; step 4's error stopped it
  ckpt.close()
  rerun = _train(tmp_path / "stop", num_steps=4, mesh=mesh, reward=TokenSetReward(token_ids=TARGET_IDS))
  assert rerun["step"] == 4 and all(np.isfinite(v) for k, v in rerun["metrics"].items() if k.startswith("update/"))


def test_ppo_lagrangian_with_a_cost_apart_from_the_reward(tmp_path):
  from cotsafe_jax.rewards import CompositeReward
  from cotsafe_jax.rewards.rules import TokenSetScorer
  from cotsafe_jax.rl import LagrangianConfig
  reward = CompositeReward(weights={k: {"format": 1.0} for k in ("harmful", "benign", "reasoning")},
                           token_safety=TokenSetScorer(token_ids=TARGET_IDS), token_cost=True)
  ppo = PPOConfig(lagrangian=LagrangianConfig(budget=0.0, lr=1.0), kl_coef=0.01, num_minibatches=2)
  out = T.train(workdir=str(tmp_path), policy=T.PolicySpec(config=CFG, tokenizer_dir=TOKENIZER), reward=reward,
                prompts=PROMPTS, ppo=ppo, rollout=T.RolloutConfig(max_prompt_len=48, max_new_tokens=16),
                optim=T.OptimConfig(learning_rate=3e-3), num_steps=2, prompts_per_step=8,
                mesh=parallel.single_device_mesh(), async_checkpoint=False, export_hf=False)
  h = out["history"]
  cost = [r["lagrangian/cost"] for r in h]
  assert all(c > 0.0 for c in cost)  # TARGET_IDS are 10% of the vocabulary: the random policy emits some
  # lambda logged before its step's dual update: 0, then lr * (cost_1 - budget)
  assert h[0]["lagrangian/lambda"] == 0.0 and h[1]["lagrangian/lambda"] == pytest.approx(cost[0], rel=1e-5)
  assert "update/cost_vf_loss" in h[0] and "reward/token_safety" not in h[0]  # the cost is not in the reward
