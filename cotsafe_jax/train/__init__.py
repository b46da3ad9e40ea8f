"""cotsafe_jax.train: optimizer, metric logging (trainers and checkpointing build on these).

`make_optimizer` / `make_schedule` build the AdamW chain; `MetricLogger` writes a workdir's metrics.
"""
from cotsafe_jax.train.logging import MetricLogger, truncate_metrics
from cotsafe_jax.train.optim import (SCHEDULES, cast_floating, decay_mask, make_optimizer,
                                     make_schedule, with_compute_dtype)

__all__ = [
    "SCHEDULES", "MetricLogger", "cast_floating", "decay_mask", "make_optimizer", "make_schedule",
    "truncate_metrics", "with_compute_dtype",
]
