"""Checkpoints survive kill -9 mid-save (the previous step restores); a checkpoint of another model or run is a
one-line error naming the step dir and the first differing array."""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.train.checkpointing import Checkpointer
from cotsafe_jax.types import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from cotsafe_jax.train.checkpointing import Checkpointer
    directory, n = sys.argv[1], int(sys.argv[2])
    ckpt = Checkpointer(directory, save_interval_steps=1, max_to_keep=3, async_save=True)
    for step in (1, 2):
      state = {"w": jnp.full((n,), float(step), jnp.float32), "step": jnp.int32(step)}
      ckpt.save(step, state, data={"position": step}, extra={"note": f"step {step}"})
      ckpt.wait()
      print(f"saved {step}", flush=True)
""")


def _kill_during_second_save(directory, n):
  """Run the child, kill -9 it as soon as step 2's temporary dir appears. Returns that dir (None: missed)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  child = subprocess.Popen([sys.executable, "-c", _CHILD, directory, str(n)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, env=env)
  try:
    assert child.stdout.readline().strip() == "saved 1"
    deadline = time.time() + 120
    while child.poll() is None and time.time() < deadline:
      tmp = glob.glob(os.path.join(directory, "2.*tmp*"))
      if tmp:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        return tmp[0]
      time.sleep(0.002)
    return None
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_restorable(tmp_path):
  killed_in = None
  for attempt, n in enumerate((16 << 20, 64 << 20)):  # 64 MiB, then 256 MiB if the first save was too quick
    directory = str(tmp_path / f"ckpt{attempt}")
    killed_in = _kill_during_second_save(directory, n)
    if killed_in is not None:
      break
  assert killed_in is not None, "the child finished its second save before it could be killed"
  assert os.path.isdir(killed_in) and not os.path.exists(os.path.join(directory, "2"))
  ckpt = Checkpointer(directory, save_interval_steps=1, max_to_keep=3, async_save=True)
  assert ckpt.latest_step() == 1
  target = {"w": jnp.zeros((n,), jnp.float32), "step": jnp.int32(0)}
  state, data, extra = ckpt.restore(1, target)
  assert int(state["step"]) == 1 and float(jnp.min(state["w"])) == float(jnp.max(state["w"])) == 1.0
  assert data == {"position": 1} and extra == {"note": "step 1"}
  ckpt.wait()
  assert not glob.glob(os.path.join(directory, "*tmp*"))  # the half-written save is cleaned away on open
  # the run goes on: step 2 saves again and restores
  ckpt.save(2, {"w": jnp.full((n,), 2.0, jnp.float32), "step": jnp.int32(2)}, data={"position": 2})
  ckpt.wait()
  assert ckpt.latest_step() == 2 and int(ckpt.restore(2, target)[0]["step"]) == 2
  ckpt.close()


def _train_state(hidden):
  params = {"embed": jnp.zeros((16, hidden)), "layers": {"w": jnp.zeros((2, hidden, hidden))}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  return TrainState(step=jnp.int32(3), policy=params, policy_opt=tx.init(params), critic=None, critic_opt=None,
                    rng=jax.random.PRNGKey(0), kl=None, lagrangian=None)


def test_a_checkpoint_of_another_model_is_an_error_naming_the_array(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "c"), save_interval_steps=1, async_save=False)
  ckpt.save(3, _train_state(8), data={"position": 3})
  ckpt.wait()
  restored, data, _ = ckpt.restore(3, _train_state(8))
  assert int(restored.step) == 3 and data == {"position": 3}
  with pytest.raises(CotsafeError) as e:
    ckpt.restore(3, _train_state(12))
  want = (f"cotsafe_jax: {tmp_path}/c/3: checkpoint does not fit this run's state (policy/embed is [16, 8] in the "
          "checkpoint, [16, 12] in this run; 5 more arrays differ), expected a checkpoint of the same model, "
          "optimizer and config")
  assert str(e.value).startswith(want) and "\n" not in str(e.value)
  other = _train_state(8)
  other = other.replace(critic={"head": jnp.zeros((8, 1))})
  with pytest.raises(CotsafeError, match=r"/3: checkpoint does not fit this run's state \(critic/head \[8, 1\] is "
                                         r"not in the checkpoint\)"):
    ckpt.restore(3, other)
  ckpt.close()
