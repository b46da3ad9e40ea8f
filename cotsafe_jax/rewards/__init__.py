"""cotsafe_jax.rewards."""
