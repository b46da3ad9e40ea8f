"""The project's error type: a one-line message a user can act on.

`launch/tpu_run.py` prints it as `cotsafe_jax: <message>` and exits with code 2.
"""


class CotsafeError(Exception):
  """A user-facing error: bad input, bad config, missing file. The message names the thing."""

  def __str__(self) -> str:
    msg = super().__str__()
    return msg if msg.startswith("cotsafe_jax: ") else f"cotsafe_jax: {msg}"
