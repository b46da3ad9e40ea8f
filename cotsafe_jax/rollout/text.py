"""Text in, text out: chat template in thinking format -> left-padded batch -> generate -> reasoning / answer.

For evaluation, demos and inspection; the PPO loop feeds token ids to `generate` directly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.parallel import distributed
from cotsafe_jax.rollout.sampler import Buckets, GenerateOutput, generate

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class TextCompletion:
  """One row: `response` is in thinking format, the template's opened `<think>` included; stop token dropped."""
  prompt: str
  response: str
  reasoning: str
  answer: str
  num_tokens: int  # generated tokens, the stop token included
  finished: bool  # emitted a stop id (False: ran out of max_new_tokens)


def _stop_ids(cfg: models.ModelConfig, tokenizer: Any) -> tuple[int, ...]:
  ids = [tokenizer.eos_token_id]
  ids += list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else [cfg.eos_token_id]
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def encode_chat(tokenizer: Any, prompts: Sequence[str | Sequence[dict[str, str]]], *,
                pad_id: int) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Render each prompt with the chat template (think block opened) and left-pad the token ids.

  Returns (rendered texts, prompt_bp int32, prompt_mask_bp bool). The template supplies any BOS token.
  """
  if not prompts:
    raise CotsafeError("generate_text: prompts is empty (expected at least one prompt)")
  texts = [models.apply_chat_template(tokenizer, p, add_generation_prompt=True, thinking=True) for p in prompts]
  ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
  width = max(len(x) for x in ids)
  prompt_bp = np.full((len(ids), width), pad_id, np.int32)
  mask_bp = np.zeros((len(ids), width), bool)
  for i, x in enumerate(ids):
    prompt_bp[i, width - len(x):] = x
    mask_bp[i, width - len(x):] = True
  return texts, prompt_bp, mask_bp


def decode_completions(tokenizer: Any, texts: Sequence[str], out: GenerateOutput,
                       stop_ids: Sequence[int]) -> list[TextCompletion]:
  """Decode each row's masked tokens (a final stop id dropped) and split reasoning from answer."""
  # all-gathered when the rows are sharded over several processes: every process decodes every row
  tokens_bt, mask_bt, finished_b = distributed.to_host((out.tokens_bt, out.mask_bt, out.finished_b))
  # special tokens (pad, eos, ...) are dropped but never the think tags, which some tokenizers mark special
  keep = {tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE)}
  drop = set(tokenizer.all_special_ids) - keep
  rows = []
  for prompt, toks_t, mask_t, fin in zip(texts, tokens_bt, mask_bt, finished_b):
    ids = toks_t[mask_t].tolist()
    n = len(ids)
    if fin and ids and ids[-1] in stop_ids:
      ids = ids[:-1]
    # the template opened the think block in the prompt; put it back so the response is in thinking format
    opened = THINK_OPEN + prompt.rsplit(THINK_OPEN, 1)[1] if prompt.rstrip().endswith(THINK_OPEN) else ""
    response = opened + tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)
    reasoning, answer = models.split_reasoning(response)
    rows.append(TextCompletion(prompt=prompt, response=response, reasoning=reasoning, answer=answer,
                               num_tokens=n, finished=bool(fin)))
  return rows


def generate_text(cfg: models.ModelConfig, params: Any, tokenizer: Any,
                  prompts: Sequence[str | Sequence[dict[str, str]]], *, rng: jax.Array, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  eos_ids: Sequence[int] | None = None, buckets: Buckets = "pow2",
                  mesh: Mesh | None = None) -> list[TextCompletion]:
  """Generate a thinking-format response for each prompt (a string or a list of chat messages).

  Stop ids default to the tokenizer's and the config's EOS tokens. One `generate` call for the whole batch.
  """
  models.check_vocab(tokenizer, cfg.vocab_size)
  stop = _stop_ids(cfg, tokenizer) if eos_ids is None else tuple(int(i) for i in eos_ids)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
  texts, prompt_bp, mask_bp = encode_chat(tokenizer, prompts, pad_id=pad_id)
  out = generate(cfg, params, prompt_bp, mask_bp, rng=rng, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=stop, pad_id=pad_id,
                 buckets=buckets, mesh=mesh)
  return decode_completions(tokenizer, texts, out, stop)
