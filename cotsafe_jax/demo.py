"""The CPU demo: the study (cotsafe_jax/study) for one seed, with the learning rates and steps the study chose on its
validation split. Every stage real: warm start, safety RM, SFT / RFT / PPO / sequence-only PPO, evaluation, report.
"""
from __future__ import annotations

from typing import Any

from cotsafe_jax import models
from cotsafe_jax.study.rft import RFTConfig
from cotsafe_jax.study.run import ARMS, POLICIES, EvalSettings, PPOArms, RMConfig, Tuning, run_study
from cotsafe_jax.study.task import TaskConfig
from cotsafe_jax.train.sft_trainer import SFTConfig

__all__ = ["ARMS", "POLICIES", "EvalSettings", "PPOArms", "RFTConfig", "RMConfig", "TaskConfig", "Tuning",
           "run_demo"]


def run_demo(*, workdir: str, task: TaskConfig, policy: models.ModelConfig, rm_backbone: models.ModelConfig,
             warm: SFTConfig, rm: RMConfig, sft: SFTConfig, rft: RFTConfig, ppo: PPOArms, tuning: Tuning,
             evaluation: EvalSettings, workers: int = 2, vocab_size: int = 768, mesh: Any = None) -> dict[str, Any]:
  """The study's design for the single seed task.seed (see run_study); returns its summary and run facts."""
  return run_study(workdir=workdir, seeds=(task.seed,), task=task, policy=policy, rm_backbone=rm_backbone, warm=warm,
                   rm=rm, sft=sft, rft=rft, ppo=ppo, tuning=tuning, evaluation=evaluation, workers=workers,
                   vocab_size=vocab_size, mesh=mesh, title="cotsafe_jax CPU demo: Beyond SFT in miniature, one seed")
