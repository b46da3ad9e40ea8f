"""The PPO update step's compiled per-device memory before and after the state plan, side by side.

  JAX_PLATFORMS=cpu python benchmarks/state_plan.py [--before 49e6eea] [--cases 1.5b-v5e-8 7b-v5p-64]

"before" is the code at commit --before (checked out into a temporary git worktree and imported from there in
a child process), with its trainer's state construction: params on the mesh, AdamW state from
`jax.jit(tx.init)(params)` (its shardings as that compiled init puts them), critic and reference float32 copies
of the policy, no remat, update step jitted with the state's shardings. "after" is this checkout's
train/ppo_programs (state born sharded, reference in the compute dtype, remat and everything else as the
shipped recipe sets them). Both: the issue's shapes (prompt 512 + completion 3584, one row per device per
micro-batch, fsdp over all chips, logprob_impl 'xla' before (the Mosaic kernel did not partition there) and
the default after). Prints a table, writes benchmarks/state_plan.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3
_QWEN = dict(model_type="qwen2", qkv_bias=True, head_dim=128, rope_theta=10000.0, tie_word_embeddings=False)
CASES = {  # name -> (target, R1-Distill-Qwen architecture as in gin/models/)
    "1.5b-v5e-8": ("v5e-8", dict(_QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                 num_heads=12, num_kv_heads=2)),
    "7b-v5p-64": ("v5p-64", dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                 num_heads=28, num_kv_heads=4)),
}

_CHILD = textwrap.dedent('''
    import json, os, sys
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from cotsafe_jax import models, parallel  # the code under test (before or after)
    from cotsafe_jax.rl import ppo as ppo_lib
    from cotsafe_jax.types import ScoredRollout, TrainState
    before, target, topo_name = sys.argv[1] == "before", sys.argv[2], sys.argv[3]
    cfg = models.ModelConfig(**json.loads(sys.argv[4]), param_dtype=jnp.float32, dtype=jnp.bfloat16)
    devs = topologies.get_topology_desc(topology_name=topo_name, platform="tpu").devices
    mesh = parallel.make_mesh(data=1, fsdp=len(devs), tensor=1, devices=devs)
    rows, p, t = 2 * len(devs), 512, 3584
    ppo = ppo_lib.PPOConfig(num_minibatches=1, num_microbatches=2, logprob_impl="xla" if before else "auto")
    import optax
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
    sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    if before:
      params = jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, sh), models.param_shapes(cfg),
                            models.param_shardings(cfg, mesh))
      rep = parallel.replicated(mesh)
      # what the old trainer ran: its outputs' shardings; an output that depends on no input (AdamW's count)
      # comes back on the host's default device here and on chip 0 on a TPU, where the old trainer then
      # replicated the state: replicated over the mesh
      on_mesh = lambda sh: sh if set(sh.device_set) == set(mesh.devices.flat) else rep
      init = jax.jit(tx.init).lower(params).compile()
      opt = jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, on_mesh(sh)), jax.eval_shape(tx.init, params),
                         init.output_shardings)
      head = jax.eval_shape(lambda r: ppo_lib.heads.init_head(ppo_lib.heads.ValueHead(), r, embed_dim=cfg.hidden_size),
                            jax.random.key(0))
      head_sh = ppo_lib.heads.head_shardings(ppo_lib.heads.ValueHead(), embed_dim=cfg.hidden_size, mesh=mesh)
      critic = {"backbone": params, "head": jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, sh), head, head_sh)}
      cinit = jax.jit(tx.init).lower(critic).compile()
      copt = jax.tree.map(lambda s, sh: sds(s.shape, s.dtype, on_mesh(sh)), jax.eval_shape(tx.init, critic),
                          cinit.output_shardings)
      state = TrainState(step=sds((), jnp.int32, rep), policy=params, policy_opt=opt, critic=critic, critic_opt=copt,
                         rng=sds((2,), jnp.uint32, rep), kl=None, lagrangian=None)
      bt = parallel.batch_sharding(mesh, 2)
      batch_sh = ScoredRollout(*(bt,) * 8)
      step = ppo_lib.make_update_step(cfg, cfg, ppo, tx, tx, num_completion=t,
                                      state_shardings=jax.tree.map(lambda x: x.sharding, state),
                                      batch_shardings=batch_sh)
      mb = ScoredRollout(sds((rows, p + t), jnp.int32, bt), sds((rows, p + t), jnp.bool_, bt),
                         sds((rows, t), jnp.bool_, bt), *(sds((rows, t), jnp.float32, bt) for _ in range(5)))
      args = (state, mb, sds((), jnp.float32, rep))
    else:
      from cotsafe_jax.train import ppo_programs
      cfg = cfg.replace(remat="full")
      progs = ppo_programs.PPOPrograms(policy_cfg=cfg, critic_cfg=cfg, ppo=ppo, policy_tx=tx, critic_tx=tx, mesh=mesh,
                                       rows=rows, prompt_len=p, completion_len=t, sampling=ppo_programs.Sampling())
      step, args = progs.update, progs.abstract_args()["update"]
    out = {"argument_bytes": None, "temp_bytes": None, "error": None}
    try:
      ma = step.lower(*args).compile().memory_analysis()
      out.update(argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
                 alias_bytes=int(ma.alias_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes))
      out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    except Exception as e:
      out["error"] = " ".join(str(e).split())[:400]
    print("RESULT " + json.dumps(out))
''')


def measure(side: str, tree: str, target: str, model: dict) -> dict:
  sys.path.insert(0, ROOT)
  from cotsafe_jax.plan import targets
  topo = targets.parse_target(target).topology
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(_CHILD)
  env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  res = subprocess.run([sys.executable, f.name, side, target, topo, json.dumps(model)], cwd=tree, env=env,
                       capture_output=True, text=True)
  os.unlink(f.name)
  line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
  if line is None:
    return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1][:400]}
  return json.loads(line[len("RESULT "):])


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--before", default="49e6eea", help="the commit before the state plan")
  ap.add_argument("--cases", nargs="*", default=list(CASES))
  ap.add_argument("--sides", nargs="*", default=["before", "after"],
                  help="measure only these (the others are kept from an existing state_plan.json)")
  args = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="state_plan_before_")
  subprocess.run(["git", "worktree", "add", "--detach", tmp, args.before], cwd=ROOT, check=True, capture_output=True)
  out_path = os.path.join(ROOT, "benchmarks", "state_plan.json")
  results = {}
  if os.path.exists(out_path):
    with open(out_path) as f:
      results = json.load(f)["results"]
  try:
    for case in args.cases:
      target, model = CASES[case]
      results.setdefault(case, {}).update({side: measure(side, tree, target, model)
                                           for side, tree in (("before", tmp), ("after", ROOT))
                                           if side in args.sides})
      print(case, json.dumps(results[case]), flush=True)
  finally:
    subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, capture_output=True)
  print("| case | side | arguments GiB | temporaries GiB | peak GiB | compiler |")
  print("| --- | --- | ---: | ---: | ---: | --- |")
  for case, sides in results.items():
    for side, r in sides.items():
      g = lambda k: "-" if r.get(k) is None else f"{r[k] / GIB:.1f}"  # noqa: E731
      print(f"| {case} | {side} | {g('argument_bytes')} | {g('temp_bytes')} | {g('peak_bytes')} | "
            f"{r.get('error') or 'compiled'} |")
  with open(out_path, "w") as f:
    json.dump({"before_commit": args.before, "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
