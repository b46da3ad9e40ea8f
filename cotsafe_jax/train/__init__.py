"""cotsafe_jax.train: optimizer, metric logging (trainers and checkpointing build on these).

`make_optimizer` / `make_schedule` build the AdamW chain; `MetricLogger` writes a workdir's metrics.
"""
from cotsafe_jax.train.checkpointing import Checkpointer
from cotsafe_jax.train.logging import MetricLogger, WandbConfig, truncate_metrics, wandb_run
from cotsafe_jax.train.optim import (SCHEDULES, cast_floating, decay_mask, make_optimizer,
                                     make_schedule, with_compute_dtype)
from cotsafe_jax.train.ppo_trainer import OptimConfig, PolicySpec, RolloutConfig, train as ppo_train
from cotsafe_jax.train.sft_trainer import SFTConfig, sft_train

__all__ = [
    "Checkpointer", "OptimConfig", "PolicySpec", "RolloutConfig", "SFTConfig", "ppo_train", "sft_train",
    "SCHEDULES", "MetricLogger", "cast_floating", "decay_mask", "make_optimizer", "make_schedule",
    "truncate_metrics", "WandbConfig", "wandb_run", "with_compute_dtype",
]
