"""The Mosaic kernels sized per TPU generation: the chip from the device kind, blocks fitted to its VMEM, and the
fused op compiled by Mosaic (libtpu, no TPU needed) for v4, v5e, v5p and v6e: one small shape here, the issue's
(D, V) grid at 4,096 tokens per chip in the slow test."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from cotsafe_jax import CotsafeError
from cotsafe_jax.kernels import logprob_entropy, pallas_tpu
from cotsafe_jax.parallel.mesh import MESH_AXES
from cotsafe_jax.plan import planner

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
DS, VS = (1536, 3584, 4096, 8192), (128256, 151936, 152064)


def test_chip_from_device_kind():
  # the kinds jax reports on each generation (and the deviceless topologies' devices)
  assert {k: pallas_tpu.chip_of(k).name for k in ("TPU v4", "TPU v5 lite", "TPU v5e", "TPU v5", "TPU v5p",
                                                  "TPU v6 lite", "TPU v6e")} == {
      "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
      "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
  assert pallas_tpu.chip_of("TPU7x") is pallas_tpu.UNKNOWN and pallas_tpu.UNKNOWN.vmem_bytes == 16 << 20
  assert [pallas_tpu.CHIPS[c].vmem_bytes >> 20 for c in ("v4", "v5e", "v5p", "v6e")] == [16, 128, 64, 128]


@pytest.mark.parametrize("chip", sorted(pallas_tpu.CHIPS))
@pytest.mark.parametrize("w_dtype", [jnp.bfloat16, jnp.float32])
def test_default_blocks_fit_every_chip_at_the_target_shapes(chip, w_dtype):
  c = pallas_tpu.CHIPS[chip]
  for d in DS:
    for v in VS:
      if chip == "v4" and w_dtype == jnp.float32 and d == 8192:
        # a float32 [8192, 128] W tile double-buffered, its dW tile and accumulator: over v4's 16 MiB at any block
        with pytest.raises(CotsafeError, match=r"W in a 2-byte dtype, or impl='xla'"):
          pallas_tpu.fit_blocks(c, 4096, d, v, jnp.bfloat16, w_dtype, where="test")
        continue
      bt, bv, limit = pallas_tpu.fit_blocks(c, 4096, d, v, jnp.bfloat16, w_dtype, where="test")
      need = pallas_tpu.vmem_estimate(4096, d, v, bt, bv, jnp.bfloat16, w_dtype)
      assert need <= 0.85 * c.vmem_bytes and limit <= c.vmem_bytes and need <= limit, (chip, d, v, bt, bv)
      assert bt % 16 == 0 and bv % 128 == 0 and bt <= c.blocks[0] and bv <= c.blocks[1]
  # v4's 16 MiB at D = 8192: the blocks shrink (the old fixed (256, 512) needed ~3x its VMEM)
  if chip == "v4" and w_dtype == jnp.bfloat16:
    assert pallas_tpu.fit_blocks(c, 4096, 8192, 152064, jnp.bfloat16, w_dtype, where="test")[:2] == (32, 128)
    assert pallas_tpu.vmem_estimate(4096, 8192, 152064, 256, 512, jnp.bfloat16, w_dtype) > 3 * c.vmem_bytes


def test_given_blocks_that_do_not_fit_are_an_error():
  with pytest.raises(CotsafeError, match=r"pallas_tpu blocks \(512, 1024\) at D=8192 need ~.* MiB of VMEM, over "
                                         r"85% of the 16 MiB of a v4 core"):
    pallas_tpu.fit_blocks(pallas_tpu.CHIPS["v4"], 4096, 8192, 152064, jnp.bfloat16, jnp.bfloat16, 512, 1024,
                          where="test")


def _device(chip):
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology_name=TOPOLOGIES[chip], platform="tpu").devices[0]


def _compile(chip, n, d, v, w_dtype=jnp.bfloat16):
  """The fused op's forward + backward (d/dh, d/dW of sum(logp) + sum(entropy)) compiled for one chip of that
  generation: (compiled, the chip the op sized its kernels for)."""
  mesh = Mesh(np.array([_device(chip)]).reshape(1, 1, 1), MESH_AXES)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def loss(h, w, y):
    logp, ent = logprob_entropy(h, w, y, impl="pallas_tpu", mesh=mesh)
    return logp.sum() + ent.sum()

  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=sharding),
          jax.ShapeDtypeStruct((d, v), w_dtype, sharding=sharding),
          jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding))
  return planner.compile_program("fused op", jax.jit(jax.grad(loss, argnums=(0, 1))), args)[0]


@pytest.mark.parametrize("chip", ["v4"] + [pytest.param(c, marks=pytest.mark.slow) for c in ("v5e", "v5p", "v6e")])
def test_fused_op_compiles_for_each_chip_at_a_small_shape(chip):  # CI: v4, the smallest VMEM
  compiled = _compile(chip, 256, 256, 1000)  # V not a multiple of the block: the masked last block
  assert compiled.as_text().count("tpu_custom_call") == 3  # stats, dh, dW: Mosaic kernels, not the interpreter


@pytest.mark.slow
@pytest.mark.parametrize("chip", sorted(TOPOLOGIES))
def test_fused_op_compiles_for_each_chip_at_the_target_shapes(chip):
  """Every (D, V) of the issue at 4,096 tokens on one chip, W in bf16 and (D 8192, V 152064) in float32 (not
  on v4: over its VMEM, an error, test above). The
  compiled temporaries do not grow with V (dW is accumulated tile by tile in VMEM): at most the float32 dh and
  the per-token lane tiles, plus 16 MiB."""
  n = 4096
  for d in DS:
    for v in VS:
      for w_dtype in (jnp.bfloat16,) + ((jnp.float32,) if (d, v) == (8192, 152064) and chip != "v4" else ()):
        temp = _compile(chip, n, d, v, w_dtype).memory_analysis().temp_size_in_bytes
        assert temp < 2 * n * d * 4 + 8 * n * 128 * 4 + (16 << 20), (chip, d, v, w_dtype, temp)
