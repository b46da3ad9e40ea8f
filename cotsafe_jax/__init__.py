"""cotsafe_jax: RL fine-tuning of reasoning models for the safety of their whole chain of thought."""
from cotsafe_jax.errors import CotsafeError

__all__ = ["CotsafeError"]
__version__ = "0.1.0"
