"""cotsafe_jax.train."""
