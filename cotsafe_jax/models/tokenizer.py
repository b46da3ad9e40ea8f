"""Tokenizers from local dirs (offline), chat templates in thinking format, reasoning / answer split.

Thinking format (docs/data.md): `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from cotsafe_jax.errors import CotsafeError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def load_tokenizer(path: str | os.PathLike, *, model_vocab_size: int | None = None) -> Any:
  """AutoTokenizer from a dir (local, or a gs:// URL copied to a local temp dir), never the hub; errors if its
  vocab exceeds the model's."""
  from cotsafe_jax import paths
  path = os.fspath(path)
  if not paths.isdir(path):
    raise CotsafeError(f"{path}: tokenizer dir not found (expected a local dir with tokenizer.json)")
  import transformers  # heavy import, only when a tokenizer is needed
  try:
    tok = transformers.AutoTokenizer.from_pretrained(paths.local_dir(path), local_files_only=True,
                                                     trust_remote_code=False)
  except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception for a corrupt tokenizer.json
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CotsafeError(f"{path}: cannot load a tokenizer ({detail}), expected a tokenizer saved by "
                       "save_pretrained (tokenizer.json and tokenizer_config.json)") from None
  if model_vocab_size is not None:
    check_vocab(tok, model_vocab_size, where=path)
  return tok


def check_vocab(tokenizer: Any, model_vocab_size: int, *, where: str = "tokenizer") -> None:
  n = len(tokenizer)
  if n > model_vocab_size:
    raise CotsafeError(f"{where}: tokenizer has {n} tokens but the model's vocab_size is {model_vocab_size} "
                       f"(token ids past {model_vocab_size - 1} have no embedding)")


def to_messages(prompt_or_messages: str | Sequence[dict[str, str]]) -> list[dict[str, str]]:
  if isinstance(prompt_or_messages, str):
    return [{"role": "user", "content": prompt_or_messages}]
  return [dict(m) for m in prompt_or_messages]


def apply_chat_template(tokenizer: Any, prompt_or_messages: str | Sequence[dict[str, str]], *,
                        add_generation_prompt: bool = True, thinking: bool = True) -> str:
  """Render a conversation as text with the tokenizer's chat template, opening the think block.

  Templates that know `enable_thinking` (Qwen3) get it; for others the rendered generation prompt is made to
  end with `<think>\\n` so the model starts reasoning (the R1-distill convention).
  """
  messages = to_messages(prompt_or_messages)
  if getattr(tokenizer, "chat_template", None) is None:
    raise CotsafeError("tokenizer has no chat_template (expected one in tokenizer_config.json or "
                       "chat_template.jinja)")
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       enable_thinking=thinking)
  if add_generation_prompt and thinking and not text.rstrip().endswith(THINK_OPEN):
    text = text + THINK_OPEN + "\n"
  return text


def split_reasoning(text: str, *, open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE) -> tuple[str, str]:
  """(reasoning, answer) of a response. No closing tag: all reasoning, empty answer."""
  end = text.find(close_tag)
  if end < 0:
    start = text.find(open_tag)
    body = text[start + len(open_tag):] if start >= 0 else text
    return body.strip(), ""
  head = text[:end]
  start = head.find(open_tag)
  reasoning = head[start + len(open_tag):] if start >= 0 else head
  return reasoning.strip(), text[end + len(close_tag):].strip()
