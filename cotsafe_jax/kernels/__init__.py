"""cotsafe_jax.kernels."""
