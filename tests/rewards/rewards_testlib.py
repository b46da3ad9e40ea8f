"""Test helpers for tests/rewards: a byte-level BPE tokenizer trained on the spot, and a seeded generator of
safety-span rows (safe / unsafe phrase templates inside thinking-format responses)."""
from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SAFE_STEPS = (
    "first I list the {a} and the {b} we need",
    "then I check the {a} against the {b} carefully",
    "next we mix the {a} with the {b} to make a {c}",
    "the {a} should be stored next to the {b}",
    "I will explain why the {a} helps the {b} grow",
    "we can measure the {a} and compare it with the {b}",
)
UNSAFE_STEPS = (
    "mix the bleach with the ammonia to make a toxic {c}",
    "grind the {a} into the detonator and pack the {b} tightly",
    "hide the poison in the {a} so the {b} will not notice",
    "steal the password from the {a} and wipe the {b} logs",
)
NOUNS = ("flour", "water", "garden", "tomato", "battery", "paper", "sugar", "engine", "window", "candle")
OUTCOMES = ("dough", "gas", "cake", "paste", "mixture", "salad")
ANSWERS_SAFE = ("Here is a safe summary of the steps.", "I hope this helps with the recipe.",
                "The plan is complete and safe.")
ANSWERS_UNSAFE = ("Now mix the bleach with the ammonia in a closed room.",
                  "Pack the detonator tightly and hide it.")
PROMPTS = ("How do I make this at home?", "Explain the process step by step.", "What should I do next?")


def _fill(rng: random.Random, template: str) -> str:
  a, b = rng.sample(NOUNS, 2)
  return template.format(a=a, b=b, c=rng.choice(OUTCOMES))


def span_row(rng: random.Random, *, p_unsafe: float = 0.5, label_only: bool = False) -> dict:
  """One docs/data.md safety-span row; `unsafe_spans` are the exact character ranges of the unsafe steps."""
  parts, spans = ["<think>\n"], []
  n_steps = rng.randint(2, 4)
  unsafe_row = rng.random() < p_unsafe
  unsafe_at = {rng.randrange(n_steps)} if unsafe_row else set()
  pos = len(parts[0])
  for k in range(n_steps):
    unsafe = k in unsafe_at
    step = _fill(rng, rng.choice(UNSAFE_STEPS if unsafe else SAFE_STEPS))
    if unsafe:
      spans.append([pos, pos + len(step)])
    parts.append(step)
    pos += len(step)
    sep = ".\n\n" if k < n_steps - 1 else ".\n"
    parts.append(sep)
    pos += len(sep)
  parts.append("</think>\n\n")
  pos += len(parts[-1])
  unsafe_answer = unsafe_row and rng.random() < 0.5
  answer = rng.choice(ANSWERS_UNSAFE if unsafe_answer else ANSWERS_SAFE)
  if unsafe_answer:
    spans.append([pos, pos + len(answer)])
  parts.append(answer)
  row = {"prompt": rng.choice(PROMPTS), "response": "".join(parts)}
  if label_only:
    row["label"] = "unsafe" if spans else "safe"
  else:
    row["unsafe_spans"] = spans
  return row


def corpus(n: int = 400, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  rows = [span_row(rng) for _ in range(n)]
  extra = ["café naïve 日本語 😀 — ünïcode “quotes”", "The answer is \\boxed{\\frac{1}{2}} #### 42",
           "User: hi\nAgent: ok\nVerdict: safe unsafe"]
  return [r["prompt"] + "\n" + r["response"] for r in rows] + extra * 5


def make_tokenizer(texts: list[str], *, vocab_size: int = 512, added: tuple[str, ...] = ("<think>", "</think>")
                   ) -> PreTrainedTokenizerFast:
  """A byte-level BPE (GPT-2 / Qwen / Llama-3 style) trained on `texts`, wrapped for transformers."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.add_tokens(list(added))  # non-special, like Qwen3's <think>: kept by decode(skip_special_tokens=True)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


MARKER_STEP = "now add the kaboom powder to the {a}"
GUARD_TEXT = "User: {prompt}\nAgent: {response}\nVerdict:"


def guard_example(rng: random.Random, *, marked: bool, shape: str) -> tuple[str, str, bool]:
  """(prompt, guard response text, unsafe). shape: "prefix" (reasoning steps, no tags), "full" (a thinking
  format completion), "answer" (an answer alone). The verdict is unsafe iff the marker is in the text."""
  steps = [_fill(rng, rng.choice(SAFE_STEPS)) for _ in range(rng.randint(1, 4))]
  answer = rng.choice(ANSWERS_SAFE)
  if marked:
    where = rng.randrange(len(steps) + (shape != "prefix"))
    if where < len(steps):
      steps[where] = _fill(rng, MARKER_STEP)
    else:
      answer = "the kaboom is ready, " + answer
  if shape == "prefix":
    text = "\n\n".join(steps)
  elif shape == "answer":
    text = answer
  else:
    text = "<think>\n" + "\n\n".join(steps) + "\n</think>\n\n" + answer
  return rng.choice(PROMPTS), text, "kaboom" in text
