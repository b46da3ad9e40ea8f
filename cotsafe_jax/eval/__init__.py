"""cotsafe_jax.eval."""
