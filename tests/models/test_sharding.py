"""On 8 simulated devices (data=2, fsdp=2, tensor=2): sharded forward == single device; loaded params carry
the shardings the logical rules say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cotsafe_jax import CotsafeError, models, parallel
from tests.models.hf_fixtures import make_hf_model


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  return parallel.make_mesh(data=2, fsdp=2, tensor=2)


def test_loaded_params_carry_rule_shardings_and_forward_matches(mesh, tmp_path):
  make_hf_model("qwen2", str(tmp_path / "m"))
  cfg1, params1 = models.load_hf(str(tmp_path / "m"))
  cfg, params = models.load_hf(str(tmp_path / "m"), mesh=mesh)
  q = params["layers"]["attn"]["q_kernel"]  # (layers, embed, heads, head_dim)
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert params["embed"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed); 300 % 2 == 0
  assert params["layers"]["mlp"]["down_kernel"].sharding.spec == P(None, "tensor", "fsdp")
  assert params["final_norm"]["scale"].sharding.spec == P(None)
  # each device holds a quarter of q (fsdp x tensor), never the whole tensor
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(params1["layers"]["attn"]["q_kernel"]))

  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 12))
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  tok_s = jax.device_put(jnp.asarray(tokens), parallel.batch_sharding(mesh, 2))
  mask_s = jax.device_put(jnp.asarray(mask), parallel.batch_sharding(mesh, 2))
  sharded = models.forward(cfg, params, tok_s, attention_mask_bt=mask_s)
  single = models.forward(cfg1, params1, jnp.asarray(tokens), attention_mask_bt=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_init_params_born_sharded(mesh):
  cfg = models.tiny_config("llama", vocab_size=64)
  params = models.init_params(cfg, jax.random.key(0), mesh=mesh)
  axes = models.param_logical_axes(cfg)
  for leaf, ax in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    assert leaf.sharding.spec == parallel.logical_to_spec(ax, leaf.shape, mesh)


def test_mesh_errors_name_numbers():
  with pytest.raises(CotsafeError, match="data=3 x fsdp=1 x tensor=1 does not divide the"):
    parallel.make_mesh(data=3, fsdp=1)


def test_default_mesh_is_fsdp_over_every_device():
  assert dict(parallel.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(parallel.make_mesh(data=2).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
