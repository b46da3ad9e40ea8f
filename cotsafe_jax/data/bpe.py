"""Byte-level BPE tokenizers trained on local text, saved as HF tokenizer dirs with a thinking-format template.

`transformers.AutoTokenizer.from_pretrained(dir)` loads them offline (transformers 4 and 5).
"""
from __future__ import annotations

import json
import re
from typing import Iterable

from cotsafe_jax import paths
from cotsafe_jax.errors import CotsafeError

SPECIAL_TOKENS = ("<pad>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>")
# think tags are added but not special, so decode(skip_special_tokens=True) keeps the think/answer split
_NON_SPECIAL = ("<think>", "</think>")

# HF renders templates with trim_blocks/lstrip_blocks: no newline may follow a block tag
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% if m['reasoning_content'] is defined %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|end|>"
    "{% else %}{{ raise_exception('this chat template has no role ' + m['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")


def _strip_special(text: str) -> list[str]:
  """Pieces of `text` between special tokens: the BPE must not learn merges that spell them."""
  return [p for p in re.split("|".join(re.escape(s) for s in SPECIAL_TOKENS), text) if p]


def train_tokenizer(*, texts: Iterable[str], out_dir: str, vocab_size: int = 576) -> str:
  """Train a byte-level BPE on `texts`; save an HF tokenizer dir (AutoTokenizer-loadable, offline)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise CotsafeError(f"train_tokenizer: vocab_size={vocab_size}, expected >= {256 + len(SPECIAL_TOKENS)} "
                       "(256 bytes + special tokens)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator((piece for t in texts for piece in _strip_special(t)), trainer)
  spec = json.loads(tok.to_str())
  for added in spec["added_tokens"]:
    added["special"] = added["content"] not in _NON_SPECIAL
  paths.write_text(paths.join(out_dir, "tokenizer.json"), json.dumps(spec, ensure_ascii=False, indent=2) + "\n")
  # written by hand (not save_pretrained) so the files are byte-stable and load in transformers 4 and 5
  fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|end|>",
            "pad_token": "<pad>", "unk_token": None, "additional_special_tokens": ["<|user|>", "<|assistant|>"],
            "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in fields} for a in spec["added_tokens"]},
            "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "model_max_length": 256,
            "padding_side": "left"}
  paths.write_text(paths.join(out_dir, "tokenizer_config.json"),
                   json.dumps(config, ensure_ascii=False, indent=2) + "\n")
  return out_dir
