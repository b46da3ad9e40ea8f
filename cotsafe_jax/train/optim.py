"""Optimizer: AdamW with linear warmup + cosine or constant schedule, global-norm clipping.

Weight decay skips 1-D params (norm scales, biases). Also float32-master / bf16-compute casting.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cotsafe_jax.errors import CotsafeError

SCHEDULES = ("cosine", "constant")


def make_schedule(*, learning_rate: float, schedule: str = "cosine", warmup_steps: int,
                  total_steps: int, min_lr_ratio: float = 0.0) -> optax.Schedule:
  """lr(step): linear 0 -> learning_rate over warmup_steps, then constant, or cosine down to
  learning_rate * min_lr_ratio at total_steps (held there after):
    lr = lr_min + (lr_max - lr_min) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
  """
  if schedule not in SCHEDULES:
    raise CotsafeError(f"make_schedule: schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
  if not learning_rate > 0.0:
    raise CotsafeError(f"make_schedule: learning_rate={learning_rate} must be > 0")
  if warmup_steps < 0 or total_steps < 1:
    raise CotsafeError(f"make_schedule: need warmup_steps >= 0 and total_steps >= 1, got "
                       f"warmup_steps={warmup_steps}, total_steps={total_steps}")
  if not 0.0 <= min_lr_ratio <= 1.0:
    raise CotsafeError(f"make_schedule: min_lr_ratio={min_lr_ratio} must be in [0, 1]")
  if schedule == "cosine":
    if warmup_steps >= total_steps:
      raise CotsafeError(f"make_schedule: warmup_steps={warmup_steps} must be < total_steps="
                         f"{total_steps} for the cosine schedule")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=learning_rate * min_lr_ratio)
  if warmup_steps == 0:
    return optax.constant_schedule(learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
      [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for params that get weight decay: those with 2+ dims (matrices, embeddings)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(*, learning_rate: float, schedule: str = "cosine", warmup_steps: int,
                   total_steps: int, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                   min_lr_ratio: float = 0.0) -> optax.GradientTransformation:
  """clip_by_global_norm(max_grad_norm) then AdamW on `make_schedule`; None or 0 = no clipping."""
  if weight_decay < 0.0:
    raise CotsafeError(f"make_optimizer: weight_decay={weight_decay} must be >= 0")
  if max_grad_norm is not None and max_grad_norm < 0.0:
    raise CotsafeError(f"make_optimizer: max_grad_norm={max_grad_norm} must be >= 0 (or None)")
  lr = make_schedule(learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
                     total_steps=total_steps, min_lr_ratio=min_lr_ratio)
  adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  if not max_grad_norm:
    return adamw
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def cast_floating(tree: Any, *, dtype) -> Any:
  """Cast the floating-point leaves of a pytree to dtype (integer leaves untouched)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def with_compute_dtype(loss_fn: Callable[..., Any], *, dtype=jnp.bfloat16) -> Callable[..., Any]:
  """loss_fn(params, ...) with params cast to dtype inside: float32 master params and optimizer
  state, bf16 matmuls; jax.grad of the wrapper returns float32 grads (the cast's transpose)."""
  def wrapped(params, *args, **kwargs):
    return loss_fn(cast_floating(params, dtype=dtype), *args, **kwargs)
  return wrapped


def opt_state_shardings(tx: optax.GradientTransformation, param_shapes: Any, param_shardings: Any,
                        replicated: Any) -> Any:
  """Shardings of `tx`'s state for params of `param_shapes`: every moment split like its param, the rest
  (step counts) `replicated`. Used as out_shardings of the state's init, so the state is born sharded."""
  opt_shapes = jax.eval_shape(tx.init, param_shapes)
  return optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_shardings,
                               transform_non_params=lambda _: replicated)
