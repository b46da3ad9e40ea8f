"""Generation throughput: cotsafe_jax.rollout.generate vs transformers' PyTorch generate on CPU, same weights.

Run: python benchmarks/generate.py [--batch 16 --prompt 64 --new 128 --rounds 3 --threads 2 --out FILE.json]
A random-weight Qwen2 model (4 layers, d_model 512, vocab 32000) is built in PyTorch, saved as an HF dir and
loaded into ours with models.load_hf. Both sample at temperature 1 with no top-k / top-p and no stop token,
so both emit exactly --new tokens per row. The two are timed in alternating rounds in one process (the CPU
may be shared: the table reports the load average and per-round ratios); our compile time is reported apart.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import _common  # benchmarks/_common.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--new", type=int, default=128)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core it sees)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/generate_cpu.json)")
  args = p.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM

  from cotsafe_jax import models, rollout

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  hf_cfg = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch_model = Qwen2ForCausalLM(hf_cfg).eval()
  torch_model.generation_config.eos_token_id = None
  torch_model.generation_config.pad_token_id = 0
  with tempfile.TemporaryDirectory() as d:
    torch_model.save_pretrained(d)
    cfg, params = models.load_hf(d)

  b, n = args.batch, args.new
  prompt = np.random.RandomState(0).randint(1, 32000, (b, args.prompt)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  ids, attn = torch.from_numpy(prompt.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  with torch.no_grad():  # same weights: the last-position logits agree
    ref = torch_model(input_ids=ids, attention_mask=attn).logits[:, -1].numpy()
  ours = np.asarray(models.forward(cfg, params, prompt, attention_mask_bt=mask))[:, -1]
  logits_diff = float(np.abs(ours - ref).max())

  def run_torch(threads=args.threads):
    torch.set_num_threads(threads)
    with torch.no_grad():
      out = torch_model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=n, min_new_tokens=n)
    assert out.shape == (b, args.prompt + n), out.shape

  calls = iter(range(10**6))

  def run_ours():
    out = rollout.generate(cfg, params, prompt, mask, rng=jax.random.key(next(calls)), max_new_tokens=n,
                           temperature=1.0, buckets=(args.prompt,))
    jax.block_until_ready(out)
    assert int(np.asarray(out.mask_bt).sum()) == b * n

  def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0

  load_start = os.getloadavg()
  first_s, _ = timed(run_ours)  # trace + compile + one run
  second_s, _ = timed(run_ours)  # right after, under the same load: the difference is the compile
  timed(run_torch)  # torch's first call initialises lazily; not counted
  rounds = []
  for _ in range(args.rounds):
    tw, tc = timed(run_torch)
    t1w, _ = timed(lambda: run_torch(1))  # context: on a contended CPU one torch thread can beat two
    ow, oc = timed(run_ours)
    rounds.append({"torch_s": tw, "torch_cpu_s": tc, "torch_1thread_s": t1w, "ours_s": ow, "ours_cpu_s": oc,
                   "ratio": tw / ow})
    print(f"round: torch {b * n / tw:7.1f} tok/s (1 thread {b * n / t1w:7.1f})   ours {b * n / ow:7.1f} tok/s   "
          f"ratio {tw / ow:5.2f}")
  load_end = os.getloadavg()

  torch_s = statistics.median(r["torch_s"] for r in rounds)
  ours_s = statistics.median(r["ours_s"] for r in rounds)
  result = {
      "machine": _common.describe(), "torch_threads": args.threads, "jax": jax.__version__, "torch": torch.__version__,
      "load_avg_start": load_start, "load_avg_end": load_end,
      "model": "Qwen2, 4 layers, d_model 512, 8 heads / 2 kv heads, mlp 1536, vocab 32000, float32",
      "batch": b, "prompt_len": args.prompt, "new_tokens": n, "sampling": "temperature 1, no top-k/top-p",
      "last_logits_max_abs_diff": logits_diff,
      "torch_tokens_per_s": b * n / torch_s, "ours_tokens_per_s": b * n / ours_s, "ratio": torch_s / ours_s,
      "torch_1thread_tokens_per_s": b * n / statistics.median(r["torch_1thread_s"] for r in rounds),
      "ratio_best_rounds": min(r["torch_s"] for r in rounds) / min(r["ours_s"] for r in rounds),
      "ours_first_call_s": first_s, "ours_compile_s": first_s - second_s,
      "torch_cpu_s_per_1k_tokens": 1e3 * statistics.median(r["torch_cpu_s"] for r in rounds) / (b * n),
      "ours_cpu_s_per_1k_tokens": 1e3 * statistics.median(r["ours_cpu_s"] for r in rounds) / (b * n),
      "rounds": rounds,
  }
  print(f"\n{result['machine']}; load average {load_start[0]:.1f} -> {load_end[0]:.1f}; "
        f"last-logit max |diff| {logits_diff:.1e}")
  print("| sampler | tokens/s | CPU s / 1k tokens |\n|---|---|---|")
  print(f"| transformers {torch.__version__} generate | {result['torch_tokens_per_s']:.0f} | "
        f"{result['torch_cpu_s_per_1k_tokens']:.2f} |")
  print(f"| transformers generate, 1 torch thread | {result['torch_1thread_tokens_per_s']:.0f} | |")
  print(f"| cotsafe_jax rollout.generate | {result['ours_tokens_per_s']:.0f} | "
        f"{result['ours_cpu_s_per_1k_tokens']:.2f} |")
  print(f"ratio (ours / transformers): {result['ratio']:.2f}x of median round times, "
        f"{result['ratio_best_rounds']:.2f}x of best round times; our compile: {result['ours_compile_s']:.1f} s")
  _common.write_json(result, args.out, "generate_cpu.json")


if __name__ == "__main__":
  main()
