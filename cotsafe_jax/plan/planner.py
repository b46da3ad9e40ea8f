"""Compile every program of a run for a target, ahead of time on this host, and account its memory per device.

The compiler's per-device bytes (`memory_analysis`) are the truth; the state's bytes are the sums of its shards.
A program's peak counts what stays resident while it runs (every model's params, both optimizer states) plus
its own arguments, outputs and temporaries (the KV cache of a rollout is a temporary of `generate`):
    peak = resident not among its arguments + arguments + outputs - donated (aliased) + temporaries.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from cotsafe_jax import models
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.parallel import mesh as mesh_lib
from cotsafe_jax.plan.targets import GIB, Target
from cotsafe_jax.train.ppo_programs import tree_device_bytes

PPO_PROGRAMS = ("decode_params", "generate", "score", "advantage", "update")
ALL_PROGRAMS = PPO_PROGRAMS + ("safety_rm", "guard", "sft_step")


@dataclasses.dataclass
class ProgramPlan:
  """One compiled program on one device."""
  name: str
  argument_bytes: int = 0
  output_bytes: int = 0
  temp_bytes: int = 0
  alias_bytes: int = 0
  resident_outside_bytes: int = 0  # resident state the program does not take as an argument
  peak_bytes: int = 0
  fits: bool = False
  flops: float | None = None  # compiled (cost_analysis; a loop body counted once)
  bytes_accessed: float | None = None
  model_flops: float | None = None  # analytic, whole program, all devices
  compile_seconds: float = 0.0
  error: str | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def compile_program(name: str, program: Any, args: Sequence[Any]) -> tuple[Any, float]:
  """(compiled, seconds). Outside the persistent compilation cache: an executable for devices this host does
  not have can be neither stored nor loaded there."""
  t0 = time.perf_counter()
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    compiled = program.lower(*args).compile()
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  return compiled, time.perf_counter() - t0


# what a TPU compile that runs out of HBM reports, e.g. "Ran out of memory on HBM, the total memory required
# for HLO temporaries (4.25G) exceeds available HBM (2.93G)", or "Used 289.02G of 15.75G hbm"
_OOM = (re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT]?)\)"),
        re.compile(r"[Uu]sed ([0-9.]+)([KMGT]?)(?:i?B)? of [0-9.]+[KMGT]?(?:i?B)? hbm"))
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _oom_bytes(message: str) -> tuple[int, str] | None:
  """(bytes, what they count) from a TPU compile that ran out of HBM: the temporaries, or the whole program."""
  for pattern, what in zip(_OOM, ("temporaries", "total")):
    m = pattern.search(message)
    if m:
      return int(float(m.group(1)) * _UNITS[m.group(2)]), what
  return None


def measure(name: str, program: Any, args: Sequence[Any], *, resident_total: int, resident_in_args: int,
            usable_bytes: int, model_flops: float | None) -> ProgramPlan:
  """Compile `program` over abstract `args` and fill a ProgramPlan (a compile that runs out of memory is a
  plan that does not fit, with the bytes the compiler reported)."""
  out = ProgramPlan(name, model_flops=model_flops, resident_outside_bytes=resident_total - resident_in_args)
  try:
    compiled, out.compile_seconds = compile_program(name, program, args)
  except Exception as e:  # noqa: BLE001 - the compiler's message is the result
    msg = str(e)
    out.error = next((line.strip() for line in msg.splitlines() if line.strip()), type(e).__name__)[:500]
    found = _oom_bytes(msg)
    if found is None:
      raise CotsafeError(f"plan: program {name!r} does not compile: {out.error}") from e
    needed, what = found
    # the temporaries alone already exceed the chip: a lower bound of the peak (arguments not known)
    out.temp_bytes = needed if what == "temporaries" else 0
    out.peak_bytes = out.resident_outside_bytes + needed
    return out
  ma = compiled.memory_analysis()
  out.argument_bytes = int(ma.argument_size_in_bytes)
  out.output_bytes = int(ma.output_size_in_bytes)
  out.temp_bytes = int(ma.temp_size_in_bytes)
  out.alias_bytes = int(ma.alias_size_in_bytes)
  out.peak_bytes = (out.resident_outside_bytes + out.argument_bytes + out.output_bytes - out.alias_bytes
                    + out.temp_bytes)
  out.fits = out.peak_bytes <= usable_bytes
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not implemented on every backend (GPU)
    cost = None
  if isinstance(cost, Sequence) and cost:
    cost = cost[0]
  if isinstance(cost, Mapping):
    out.flops = float(cost["flops"]) if "flops" in cost else None
    out.bytes_accessed = float(cost["bytes accessed"]) if "bytes accessed" in cost else None
  return out


# ---- analytic model FLOPs (matmuls only; 2 per multiply-add) ----------------------------------------------
def forward_flops(cfg: models.ModelConfig, *, tokens: int, context: float, unembed_tokens: int) -> float:
  """FLOPs of `tokens` forward tokens attending to `context` keys on average, with the [D, V] unembedding
  applied to `unembed_tokens` of them."""
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  dense = 2 * l * (d * q + 2 * d * kv + q * d + 3 * d * f)
  attention = 2 * 2 * l * q * context  # q.k and p.v
  return tokens * (dense + attention) + 2.0 * unembed_tokens * d * cfg.vocab_size


def ppo_model_flops(policy: models.ModelConfig, critic: models.ModelConfig | None, *, rows: int, prompt: int,
                    completion: int, minibatch_rows: int) -> dict[str, float]:
  s = prompt + completion
  causal = (s + 1) / 2  # mean keys per query of a causal sequence
  fwd = lambda cfg, n, unembed: forward_flops(cfg, tokens=n * s, context=causal, unembed_tokens=n * unembed)  # noqa
  # rollout: prefill of the prompt, then one token per step attending to the whole prefix
  gen = forward_flops(policy, tokens=rows * prompt, context=(prompt + 1) / 2, unembed_tokens=rows)
  gen += forward_flops(policy, tokens=rows * (completion - 1), context=prompt + completion / 2,
                       unembed_tokens=rows * (completion - 1))
  score = 2 * fwd(policy, rows, completion) + (fwd(critic, rows, 0) if critic is not None else 0.0)
  update = 3 * fwd(policy, minibatch_rows, completion) + (3 * fwd(critic, minibatch_rows, 0) if critic else 0.0)
  return {"decode_params": None, "generate": gen, "score": score, "advantage": None, "update": update}


def table(programs: Sequence[ProgramPlan], hbm_bytes: int) -> str:
  """Markdown table of per-device bytes (GiB) and FLOPs."""
  g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
  e = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
  lines = ["| program | arguments | outputs | temporaries | resident elsewhere | peak GiB | % of HBM | fits | "
           "compiled FLOPs | model FLOPs | compile s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
  for p in programs:
    if p.error:
      lines.append(f"| {p.name} | - | - | - | {g(p.resident_outside_bytes)} | {g(p.peak_bytes)} | "
                   f"{100 * p.peak_bytes / hbm_bytes:.0f} | no (compiler: out of memory) | - | "
                   f"{e(p.model_flops)} | - |")
      continue
    lines.append(f"| {p.name} | {g(p.argument_bytes)} | {g(p.output_bytes - p.alias_bytes)} | {g(p.temp_bytes)} | "
                 f"{g(p.resident_outside_bytes)} | {g(p.peak_bytes)} | {100 * p.peak_bytes / hbm_bytes:.0f} | "
                 f"{'yes' if p.fits else 'no'} | {e(p.flops)} | {e(p.model_flops)} | {p.compile_seconds:.0f} |")
  return "\n".join(lines)


def abstract(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def cast_shapes(shapes: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype if jnp.issubdtype(s.dtype, jnp.floating)
                                                     else s.dtype), shapes)


def rows_args(mesh, batch: int, length: int) -> tuple[Any, Any]:
  sh = mesh_lib.batch_sharding(mesh, 2, (batch, length))
  return (jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sh),
          jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=sh))


def summary_line(target: Target, programs: Sequence[ProgramPlan], reserve: float) -> str | None:
  """The one-line error for the first program that does not fit, or None."""
  bad = [p for p in programs if not p.fits]
  if not bad:
    return None
  p = max(bad, key=lambda x: x.peak_bytes)
  return (f"plan: {p.name} needs {p.peak_bytes / GIB:.1f} GiB per device on {target.name} "
          f"({target.hbm_bytes / GIB:.0f} GiB HBM, {int(reserve * 100)}% kept free: "
          f"{(1 - reserve) * target.hbm_bytes / GIB:.1f} GiB usable); try more devices on make_mesh.fsdp, "
          "PolicySpec.remat='full', more micro-batches (PPOConfig.num_microbatches / score_microbatches), "
          "fewer rows per step or a shorter RolloutConfig.max_new_tokens")


def count_bytes(tree: Any) -> int:
  return tree_device_bytes(tree) if tree is not None else 0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  return fn(), time.perf_counter() - t0


def ceil_to(n: int, m: int) -> int:
  return max(m, int(math.ceil(n / m)) * m)
