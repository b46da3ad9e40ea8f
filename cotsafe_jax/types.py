"""flax.struct dataclasses passed between the stages of a PPO iteration; fields carry their shapes in names.

B rows (prompts x samples), P prompt tokens (left-padded), T completion tokens (right-padded), S = P + T.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class Rollout:
  """Prompt + sampled completion, as the trainer scores it. tokens_bs = concat(prompt, completion)."""
  tokens_bs: jax.Array
  mask_bs: jax.Array
  completion_mask_bt: jax.Array


@flax.struct.dataclass
class ScoredRollout:
  """A rollout with everything the update needs, per completion token."""
  tokens_bs: jax.Array
  mask_bs: jax.Array
  completion_mask_bt: jax.Array
  old_logp_bt: jax.Array
  ref_logp_bt: jax.Array
  old_values_bt: jax.Array
  advantages_bt: jax.Array
  returns_bt: jax.Array
  old_cost_values_bt: jax.Array | None = None  # PPO-Lagrangian: the cost head's values and GAE targets
  cost_returns_bt: jax.Array | None = None


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position. critic* are None without a critic."""
  step: jax.Array
  policy: Any
  policy_opt: Any
  critic: Any
  critic_opt: Any
  rng: jax.Array
  kl: Any
  lagrangian: Any
