"""The `plan` job at tiny scale: every program compiled for a TPU slice (libtpu) and NVIDIA GPUs (deviceless
CUDA plugin) on this CPU host; per-device bytes checked against the state's shards; the one-line error."""
import json
import math
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models, parallel
from cotsafe_jax.errors import CotsafeError
from cotsafe_jax.plan import planner, run as plan_lib, targets
from cotsafe_jax.rl.ppo import PPOConfig
from cotsafe_jax.train import ppo_programs
from cotsafe_jax.train.ppo_trainer import OptimConfig, PolicySpec, RolloutConfig
from cotsafe_jax.train.sft_trainer import SFTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = models.tiny_config("qwen2", vocab_size=256)
TPU, GPU = "v5e-4", "2xH100"  # the v5e:2x2 and a 2-GPU H100 topology


def test_targets_by_vendor_name():
  for name, platform, chips, gib in [("v5e-8", "tpu", 8, 16), ("v5p-64", "tpu", 32, 95), ("v6e-16", "tpu", 16, 32),
                                     ("8xH100", "cuda", 8, 79.1), ("8xH200", "cuda", 8, 141.0)]:
    t = targets.parse_target(name)
    assert (t.platform, t.chips) == (platform, chips)
    assert t.hbm_bytes / 2**30 == pytest.approx(gib, abs=0.1)
  for bad in ("v5e-3", "v9-8", "8xA100", "x"):
    with pytest.raises(CotsafeError, match="plan: "):
      targets.parse_target(bad)


def _shard_shape(x, mesh):
  """Per-device shape from the PartitionSpec and the mesh's axis sizes (not from jax's shard_shape)."""
  spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
  out = []
  for d, axes in zip(x.shape, spec):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    out.append(d // math.prod(mesh.shape[a] for a in names))
  return out


def _device_bytes(x, fmt, mesh):
  """Bytes of one device's shard in the compiled layout: the minor dims padded to the layout's tile (TPU
  (8, 128)-style tiles; none on GPU). 0 for an argument the program does not use."""
  if fmt.layout is None:
    return 0
  shape = _shard_shape(x, mesh)
  dims = [shape[i] for i in fmt.layout.major_to_minor] if shape else []
  tile = fmt.layout.tiling[0] if fmt.layout.tiling else ()
  dims = [1] * (len(tile) - len(dims)) + dims
  for j, t in enumerate(reversed(tile)):
    dims[-1 - j] = -(-dims[-1 - j] // t) * t
  return math.prod(dims) * jnp.dtype(x.dtype).itemsize


@pytest.fixture(scope="module", params=[TPU, GPU])
def compiled_programs(request):
  """The tiny run's PPO programs (GAE + critic, kl in the loss so every argument is used) and its SFT step,
  compiled for the target."""
  target = targets.parse_target(request.param)
  mesh = parallel.make_mesh(devices=targets.devices(target))
  cfg = TINY.replace(dtype=jnp.bfloat16, remat="full")
  ppo = PPOConfig(num_minibatches=2, kl_mode="loss", kl_kind="k3").for_mesh(rows=8, shards=mesh.size)
  tx = OptimConfig().make(10)
  progs = ppo_programs.PPOPrograms(policy_cfg=cfg, critic_cfg=cfg, ppo=ppo, policy_tx=tx, critic_tx=tx, mesh=mesh,
                                   rows=8, prompt_len=16, completion_len=16, sampling=ppo_programs.Sampling())
  args = progs.abstract_args()
  compiled = {name: getattr(progs, name).lower(*args[name]).compile() for name in args}
  return request.param, mesh, progs, args, compiled


def test_tiny_ppo_programs_compile_and_state_bytes_match_shards(compiled_programs):
  target, mesh, progs, args, compiled = compiled_programs
  state, reference = args["update"][0], args["score"][1]
  state_args = {"update": (state,), "score": (state.policy, reference, state.critic), "generate": (),
                "decode_params": (state.policy,), "advantage": ()}  # leading arguments that are resident state
  for name, c in compiled.items():
    formats = jax.tree.leaves(c.input_formats)
    leaves = jax.tree.leaves(args[name])
    assert len(formats) == len(leaves)
    # the compiler's per-device argument bytes == the shards' bytes from the specs (in the compiled layouts)
    assert c.memory_analysis().argument_size_in_bytes == sum(
        _device_bytes(x, f, mesh) for x, f in zip(leaves, formats)), name
    n = len(jax.tree.leaves(state_args[name]))
    share = sum(_device_bytes(x, f, mesh) for x, f in zip(leaves[:n], formats[:n]))
    accounted = planner.count_bytes(state_args[name]) if n else 0  # what the plan counts as resident
    if target == GPU:  # no tile padding: byte for byte
      assert share == accounted, name
    else:  # TPU tiles pad small minor dims; the plan's count is the unpadded lower bound
      assert accounted <= share, name
  whole = sum(x.size * 4 for x in jax.tree.leaves(state.policy))
  per_device = sum(math.prod(_shard_shape(x, mesh)) * 4 for x in jax.tree.leaves(state.policy))
  assert per_device < 0.6 * whole  # the float32 policy is split, not replicated


def test_generate_temporaries_do_not_scale_with_the_layer_weights():
  # compiled for v5e:2x2 at two MLP widths: generate reads the decode layout (bf16, whole per chip) as an argument
  # made once per rollout; the layer weights' growth shows in its argument bytes, not in its temporaries (the cache
  # and activations)
  from cotsafe_jax.rollout import decode, sampler
  mesh = parallel.make_mesh(devices=targets.devices(targets.parse_target(TPU)))
  rows = parallel.batch_sharding(mesh, 2, (8, 16))
  prompt = (jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((8, 16), bool, sharding=rows),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh)))
  temps, args, layer_bytes = [], [], []
  for width in (512, 4096):
    cfg = models.tiny_config("qwen2", vocab_size=256, hidden_size=512, intermediate_size=width, dtype=jnp.bfloat16)
    layout = decode.abstract_decode_params(cfg, mesh)
    program = sampler.generate_program(cfg, mesh, batch=8, prompt_len=16, max_new_tokens=16, temperature=1.0)
    ma = program.lower(layout, *prompt).compile().memory_analysis()
    temps.append(ma.temp_size_in_bytes)
    args.append(ma.argument_size_in_bytes)
    layer_bytes.append(sum(x.size * 2 for x in jax.tree.leaves(layout.weights["layers"])))  # bf16, whole per chip
  grown = layer_bytes[1] - layer_bytes[0]
  assert args[1] - args[0] == pytest.approx(grown, rel=0.01), (args, grown)  # the weights come in as arguments
  # what does grow is the MLP's activations (8 rows x 16 prompt tokens x width): a few % of the weights here
  assert temps[1] - temps[0] < 0.15 * grown, (temps, grown)


def test_optimizer_state_sharded_like_params_in_the_compiled_update(compiled_programs):
  _, mesh, progs, args, compiled = compiled_programs
  state_in = compiled["update"].input_shardings[0][0]  # the TrainState argument's shardings, as compiled
  for params, opt in ((state_in.policy, state_in.policy_opt), (state_in.critic, state_in.critic_opt)):
    adam = next(s for s in jax.tree.leaves(opt, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))
    for moment in (adam.mu, adam.nu):
      for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(moment)):
        assert p.spec == m.spec
    assert any(any(a is not None for a in p.spec) for p in jax.tree.leaves(params))


def test_optimizer_state_sharded_like_params_in_a_real_8_device_run():
  mesh = parallel.make_mesh()  # 8 simulated CPU devices, fsdp over all of them
  ppo = PPOConfig(num_minibatches=1).for_mesh(rows=8, shards=8)
  tx = OptimConfig(learning_rate=1e-3).make(10)
  progs = ppo_programs.PPOPrograms(policy_cfg=TINY, critic_cfg=TINY, ppo=ppo, policy_tx=tx, critic_tx=tx,
                                   mesh=mesh, rows=8, prompt_len=8, completion_len=8,
                                   sampling=ppo_programs.Sampling())
  params = models.init_params(TINY, jax.random.key(0), mesh=mesh)
  state = progs.init_state(params, None, jnp.int32(0))
  rng = np.random.default_rng(0)
  mb = jax.tree.map(lambda s, sds: jax.device_put(
      (rng.integers(0, 256, sds.shape) if sds.dtype == jnp.int32 else
       np.ones(sds.shape, bool) if sds.dtype == jnp.bool_ else rng.normal(size=sds.shape)).astype(sds.dtype), s),
      progs.minibatch_shardings, progs.abstract_args()["update"][1])
  state, _ = progs.update(state, mb, jnp.float32(0.0))
  for params, opt in ((state.policy, state.policy_opt), (state.critic, state.critic_opt)):
    adam = next(s for s in jax.tree.leaves(opt, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))
    for moment in (adam.mu, adam.nu):
      for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(moment)):
        assert p.sharding.spec == m.sharding.spec and m.sharding.mesh == mesh
        assert len(m.addressable_shards) == 8
    on_fsdp = [p for p in jax.tree.leaves(params) if "fsdp" in jax.tree.leaves(tuple(p.sharding.spec))]
    assert on_fsdp and all(p.addressable_shards[0].data.size * 8 == p.size for p in on_fsdp)


def test_tiny_plan_writes_the_schema(tmp_path):
  out = plan_lib.plan(workdir=str(tmp_path), target=GPU, policy=PolicySpec(config=TINY, compute_dtype="bfloat16",
                                                                           remat="full"),
                      ppo=PPOConfig(num_minibatches=2), rollout=RolloutConfig(max_prompt_len=16, max_new_tokens=16),
                      prompts_per_step=8, optim=OptimConfig(), safety_rm_config=TINY, guard_config=TINY,
                      guard_max_len=64, sft=SFTConfig(num_steps=10, batch_size=4, max_len=32), verbose=False)
  saved = json.loads((tmp_path / "plan.json").read_text())
  assert saved == json.loads(json.dumps(out))
  for key, kind in [("target", str), ("chip", str), ("num_devices", int), ("hbm_bytes_per_device", int),
                    ("mesh", dict), ("programs", dict), ("fits", bool)]:
    assert isinstance(saved[key], kind), key
  assert saved["num_devices"] == 2 and saved["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert set(saved["programs"]) == set(planner.ALL_PROGRAMS)
  for name, p in saved["programs"].items():
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes"):
      assert isinstance(p[key], int) and p[key] >= 0, (name, key)
    assert p["fits"] is True
    assert p["peak_bytes"] >= p["argument_bytes"] + p["temp_bytes"] - p["alias_bytes"]
    assert (p["model_flops"] is None) == (name in ("advantage", "decode_params"))
  # the update's peak counts the scorers and the reference that stay resident beside it
  resident = saved["resident_bytes_per_device"]
  assert saved["programs"]["update"]["resident_outside_bytes"] == (
      resident["reference"] + resident["safety_rm"] + resident["guard"])


def test_a_plan_that_cannot_fit_exits_2_with_one_line(tmp_path):
  """A 4.3B-parameter model on one v5e chip: its float32 params and AdamW moments alone need 48 GiB."""
  big = ("plan.policy = @PolicySpec()", "PolicySpec.config = @big/ModelConfig()",
         "big/ModelConfig.model_type = 'llama'", "big/ModelConfig.vocab_size = 262144",
         "big/ModelConfig.hidden_size = 8192", "big/ModelConfig.intermediate_size = 256",
         "big/ModelConfig.num_layers = 1", "big/ModelConfig.num_heads = 64", "big/ModelConfig.num_kv_heads = 8",
         "big/ModelConfig.head_dim = 128", "plan.target = 'v5e-1'", "plan.programs = ['advantage']",
         "plan.ppo = @PPOConfig()", "plan.rollout = @RolloutConfig()", "plan.optim = @OptimConfig()",
         "plan.prompts_per_step = 1", "run.job = @plan")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), f"--workdir={tmp_path}"]
  cmd += [f"--gin_param={b}" for b in big]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 2, res.stderr[-2000:]
  last = [l for l in res.stderr.strip().splitlines() if l.strip()][-1]
  assert last.startswith("cotsafe_jax: plan: advantage needs ") and "GiB per device on v5e-1" in last
  assert "fsdp" in last and "remat" in last and "micro-batches" in last
  saved = json.loads((tmp_path / "plan.json").read_text())
  assert saved["fits"] is False and saved["programs"]["advantage"]["fits"] is False


PLAN_GINS = sorted(p for p in os.listdir(os.path.join(ROOT, "gin", "plan")) if p.endswith(".gin"))
TINY_BINDINGS = ["PolicySpec.config = @tiny_config()", "plan.safety_rm_config = @tiny_config()",
                 "plan.guard_config = @tiny_config()", "tiny_config.vocab_size = 256",
                 "RolloutConfig.max_prompt_len = 16", "RolloutConfig.max_new_tokens = 16",
                 "plan.guard_max_len = 64", "SFTConfig.max_len = 32", "plan.programs = ['update']"]


# one plan per target kind in CI (a v5e TPU slice, H100s), the rest slow: each is a 15-25 s compile on 2 cores
_CI_PLAN_GINS = ("r1_distill_qwen_1_5b_ppo_v5e_8.gin", "r1_distill_qwen_1_5b_ppo_8xh100.gin")


@pytest.mark.parametrize("name", [n if n in _CI_PLAN_GINS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PLAN_GINS])
def test_each_plan_gin_compiles_at_tiny_scale(name, tmp_path):
  """The shipped plan files with the tiny model in place of the real one: same targets, meshes, batch."""
  from cotsafe_jax import jobs
  gin.clear_config()
  gin.add_config_file_search_path(ROOT)
  try:
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "plan", name)], TINY_BINDINGS,
                                        finalize_config=False)
    out = jobs.run(workdir=str(tmp_path))
  finally:
    gin.clear_config()
  assert out["fits"] and set(out["programs"]) == {"update"}
  assert out["run"]["prompt_len"] == 16 and out["num_devices"] == targets.parse_target(out["target"]).chips


def test_shipped_recipes_are_valid_on_8_32_and_64_devices():
  """The batch splits of every training recipe divide over 8, 32 and 64 data x fsdp devices."""
  from cotsafe_jax import jobs  # noqa: F401  (registers the configurables)
  from cotsafe_jax.train import sft_trainer
  recipes = ["gin/experiments/r1_distill_qwen_1_5b_safety_ppo.gin", "gin/experiments/r1_distill_qwen_1_5b_safety_grpo.gin",
             "gin/experiments/r1_distill_qwen_7b_safety_ppo.gin",
             "gin/experiments/r1_distill_qwen_1_5b_safety_ppo_guard.gin"]
  sft_recipes = ["gin/base/sft.gin", "gin/experiments/r1_distill_qwen_1_5b_star1_sft.gin"]
  for path in recipes + sft_recipes + ["gin/experiments/safety_rm_beavertails_qwen2_5_0_5b.gin"]:
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    try:
      gin.parse_config_files_and_bindings([os.path.join(ROOT, path)],
                                          ["SFTConfig.num_steps = 1"] if path == "gin/base/sft.gin" else [],
                                          finalize_config=False)
      for devices in (8, 32, 64):
        mesh = type("Mesh", (), {"shape": {"data": 1, "fsdp": devices, "tensor": 1}})()
        if path in sft_recipes:
          sft = gin.get_configurable("SFTConfig")().for_mesh(devices)
          sft_trainer.check_batch_size(sft, mesh)
          continue
        if "safety_rm" in path:
          assert gin.query_parameter("train_safety_rm.batch_size") % devices == 0, (path, devices)
          continue
        if path.endswith("_guard.gin"):  # validation batches divide over the devices too
          assert gin.get_configurable("val/EvalConfig")().batch_size % devices == 0, (path, devices)
        rows = gin.query_parameter("%PROMPTS_PER_STEP") * gin.get_configurable("RolloutConfig")().samples_per_prompt
        ppo = gin.get_configurable("PPOConfig")().for_mesh(rows=rows, shards=devices)
        ppo_programs.check_batch_sizes(rows=rows, ppo=ppo, mesh=mesh)
    finally:
      gin.clear_config()


@pytest.mark.slow  # minutes (GPU targets) to half an hour (7B on v5p-64) of compiling each on 2 cores
@pytest.mark.parametrize("name", PLAN_GINS)
def test_each_shipped_plan_fits_at_full_size(name, tmp_path):
  """The shipped plan as a user runs it (benchmarks/plans.py commits the same runs): every program compiled for
  the real target at the real shapes fits with the reserve kept free, and the plan's peaks add up."""
  cmd = [sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), f"--gin_file=gin/plan/{name}",
         f"--workdir={tmp_path}"]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-2000:]
  saved = json.loads((tmp_path / "plan.json").read_text())
  assert saved["fits"] and set(saved["programs"]) == set(planner.ALL_PROGRAMS)
  assert saved["reserve_fraction"] == 0.1
  assert saved["usable_bytes_per_device"] == pytest.approx(0.9 * saved["hbm_bytes_per_device"], abs=1)
  for prog, p in saved["programs"].items():
    assert p["fits"] and p["peak_bytes"] <= saved["usable_bytes_per_device"], prog
    assert p["peak_bytes"] == (p["resident_outside_bytes"] + p["argument_bytes"] + p["output_bytes"]
                               - p["alias_bytes"] + p["temp_bytes"]), prog
