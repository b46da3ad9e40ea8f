"""gin/base/rewards.gin parses against the real signatures (gin rejects unknown parameter names) and leaves
the checkpoint paths required."""
import os

import gin
import pytest

from cotsafe_jax import jobs  # noqa: F401  (registers the lead's configurables)
from cotsafe_jax import rewards

GIN_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "gin", "base", "rewards.gin")


def _register(fn, name):
  try:
    gin.external_configurable(fn, name)
  except ValueError:  # already registered by cotsafe_jax/jobs.py
    pass


@pytest.fixture
def parsed():
  for fn, name in [(rewards.load_safety_rm, "load_safety_rm"), (rewards.load_guard_judge, "load_guard_judge"),
                   (rewards.GuardTemplate, "GuardTemplate")]:
    _register(fn, name)
  gin.clear_config()
  gin.parse_config_file(GIN_FILE)
  yield
  gin.clear_config()


def test_rewards_gin_binds_real_parameters(parsed):
  weights = gin.query_parameter("CompositeReward.weights")
  assert set(weights) == set(rewards.KINDS)
  assert all(set(w) <= set(rewards.COMPONENTS) for w in weights.values())
  assert gin.query_parameter("load_guard_judge.template") in rewards.GUARD_TEMPLATES
  assert gin.query_parameter("train_safety_rm.seq_pool") in rewards.SEQ_POOLS
  # the train_safety_rm job (cotsafe_jax/jobs.py) passes what it does not take itself on to the trainer: every
  # binding must be a parameter of one of the two
  import inspect
  known = set(inspect.signature(rewards.train_safety_rm).parameters) | set(
      inspect.signature(jobs.train_safety_rm.__wrapped__ if hasattr(jobs.train_safety_rm, "__wrapped__")
                        else jobs.train_safety_rm).parameters)
  bound = {p for (_, sel), ps in gin.config._CONFIG.items() if sel.endswith("train_safety_rm") for p in ps}
  assert bound and bound <= known, sorted(bound - known)
  with pytest.raises(Exception, match="export_dir"):  # the RM export must be given
    gin.get_configurable("load_safety_rm")()
  with pytest.raises(Exception, match="path"):
    gin.get_configurable("load_guard_judge")()
