"""cotsafe_jax.rollout."""
