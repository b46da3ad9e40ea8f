"""cotsafe_jax.rl."""
