"""cotsafe_jax.models."""
