"""cotsafe_jax.data."""
