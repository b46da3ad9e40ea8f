"""cotsafe_jax.rl: PPO maths (KL estimators, advantages, losses, coefficient controllers).

Everything here is a pure jax function of [B, T] arrays; the trainer composes them in rl/ppo.py.
"""
from cotsafe_jax.rl.advantages import (ESTIMATORS, AdvantageConfig, compute_advantages,
                                       discounted_returns, gae, grpo_advantages, masked_whiten,
                                       place_at_last_valid, reinforce_pp_advantages, rloo_advantages,
                                       sequence_scores, token_returns)
from cotsafe_jax.rl.controllers import (AdaptiveKLConfig, KLControllerState, LagrangianConfig,
                                        LagrangianState, init_kl_controller, init_lagrangian,
                                        unsafe_token_rate, update_kl_controller, update_lagrangian)
from cotsafe_jax.rl.kl import KL_KINDS, kl_loss, kl_penalty_in_reward, token_kl
from cotsafe_jax.rl.losses import (AGG_MODES, PolicyLoss, ValueLoss, aggregate, explained_variance,
                                   loss_normalizers)

__all__ = [
    "AGG_MODES", "ESTIMATORS", "KL_KINDS",
    "AdaptiveKLConfig", "AdvantageConfig", "KLControllerState", "LagrangianConfig", "LagrangianState",
    "PolicyLoss", "ValueLoss",
    "aggregate", "compute_advantages", "discounted_returns", "explained_variance", "gae",
    "grpo_advantages", "init_kl_controller", "init_lagrangian", "kl_loss", "kl_penalty_in_reward",
    "loss_normalizers", "masked_whiten", "place_at_last_valid", "reinforce_pp_advantages",
    "rloo_advantages", "sequence_scores", "token_kl", "token_returns", "unsafe_token_rate",
    "update_kl_controller", "update_lagrangian",
]
