"""Tiny random Hugging Face checkpoints built with transformers + torch (CPU), saved with save_pretrained."""
import os

import numpy as np

FAMILIES = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  rope_theta=50000.0, max_position_embeddings=256),
    "qwen2": dict(max_position_embeddings=256),
    "qwen3": dict(head_dim=24, max_position_embeddings=256),
}


def make_hf_model(model_type: str, out_dir: str, *, vocab_size: int = 300, tie: bool = False, seed: int = 0,
                  **overrides):
  """Build a random tiny HF model of a family and save_pretrained it; returns the torch model (eval)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
         "qwen3": transformers.Qwen3Config}[model_type]
  kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=tie, rms_norm_eps=1e-6)
  kw.update(FAMILIES[model_type])
  kw.update(overrides)
  config = cls(**kw)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():  # random init of norms / biases too, so every mapped tensor matters
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  return model


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  import torch
  with torch.no_grad():
    t = torch.tensor(np.asarray(tokens), dtype=torch.long)
    if mask is None:
      return model(input_ids=t).logits.float().numpy()
    m = torch.tensor(np.asarray(mask), dtype=torch.long)
    pos = torch.clamp(m.cumsum(-1) - 1, min=0)
    return model(input_ids=t, attention_mask=m, position_ids=pos).logits.float().numpy()
