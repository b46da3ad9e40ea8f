"""Heads on a backbone's final hidden states: the critic's value head and the safety RM's token classifier.

Both compute in float32 whatever the backbone dtype, and name their params' logical axes (embed, classes).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cotsafe_jax.parallel import mesh as mesh_lib


class TokenClassificationHead(nn.Module):
  """h [B, T, D] -> logits [B, T, num_classes] (float32). With num_classes=1 the logit is log-odds."""
  num_classes: int = 1
  init_scale: float = 0.02

  @nn.compact
  def __call__(self, h_btd: jax.Array) -> jax.Array:
    d = h_btd.shape[-1]
    w_dc = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_scale),
                                                             ("embed", "classes")), (d, self.num_classes),
                      jnp.float32)
    b_c = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
                     (self.num_classes,), jnp.float32)
    return jnp.einsum("btd,dc->btc", h_btd.astype(jnp.float32), w_dc) + b_c


class ValueHead(nn.Module):
  """h [B, T, D] -> values [B, T] (float32); zero-initialised so a fresh critic predicts 0."""

  @nn.compact
  def __call__(self, h_btd: jax.Array) -> jax.Array:
    d = h_btd.shape[-1]
    w_dc = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "classes")),
                      (d, 1), jnp.float32)
    b_c = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)), (1,),
                     jnp.float32)
    return (jnp.einsum("btd,dc->btc", h_btd.astype(jnp.float32), w_dc) + b_c)[..., 0]


def _boxed(head: nn.Module, embed_dim: int) -> Any:
  return jax.eval_shape(lambda r: head.init(r, jnp.zeros((1, 1, embed_dim), jnp.float32))["params"],
                        jax.random.key(0))


def head_logical_axes(head: nn.Module, *, embed_dim: int) -> Any:
  """Pytree (like the head's params) of logical-axis tuples."""
  specs = nn.get_partition_spec(_boxed(head, embed_dim))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def head_shardings(head: nn.Module, *, embed_dim: int, mesh: Mesh) -> Any:
  shapes = nn.meta.unbox(_boxed(head, embed_dim))
  return mesh_lib.tree_shardings(mesh, head_logical_axes(head, embed_dim=embed_dim), shapes)


def init_head(head: nn.Module, rng: jax.Array, *, embed_dim: int, mesh: Mesh | None = None) -> Any:
  """The head's params (plain dict of float32 arrays), created on their shardings when a mesh is given."""
  def init(r):
    return nn.meta.unbox(head.init(r, jnp.zeros((1, 1, embed_dim), jnp.float32))["params"])
  shardings = None if mesh is None else head_shardings(head, embed_dim=embed_dim, mesh=mesh)
  return jax.jit(init, out_shardings=shardings)(rng)


def apply_head(head: nn.Module, params: Any, h_btd: jax.Array) -> jax.Array:
  return head.apply({"params": params}, h_btd)
