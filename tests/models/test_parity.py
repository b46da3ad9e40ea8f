"""Logits parity with transformers' PyTorch models (float32, max abs difference <= 1e-4)."""
import numpy as np
import jax.numpy as jnp
import pytest

from cotsafe_jax import models
from tests.models.hf_fixtures import make_hf_model, torch_logits

ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  torch_model = make_hf_model(request.param, str(d), tie=request.param == "qwen2")
  cfg, params = models.load_hf(str(d))
  return request.param, torch_model, cfg, params, str(d)


def test_logits_match_transformers(family):
  name, torch_model, cfg, params, _ = family
  # 80 tokens: past the llama3-scaled original context (32) of the llama fixture
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 80))
  ours = np.asarray(models.forward(cfg, params, jnp.asarray(tokens)))
  err = np.abs(ours - torch_logits(torch_model, tokens)).max()
  print(f"{name}: max abs logits error {err:.2e}")
  assert err <= ATOL


def test_left_padded_batch_matches_transformers_and_unpadded(family):
  name, torch_model, cfg, params, _ = family
  rs = np.random.RandomState(2)
  tokens = rs.randint(0, cfg.vocab_size, (3, 40))
  mask = np.ones_like(tokens)
  mask[0, :13] = 0
  mask[2, :1] = 0
  tokens = np.where(mask == 1, tokens, 0)
  ours = np.asarray(models.forward(cfg, params, jnp.asarray(tokens), attention_mask_bt=jnp.asarray(mask)))
  ref = torch_logits(torch_model, tokens, mask)
  real = mask.astype(bool)
  assert np.abs(ours - ref)[real].max() <= ATOL
  alone = np.asarray(models.forward(cfg, params, jnp.asarray(tokens[0:1, 13:])))
  assert np.abs(ours[0, 13:] - alone[0]).max() <= ATOL


def test_save_hf_roundtrip_loads_in_transformers(family, tmp_path):
  import transformers
  name, _, cfg, params, _ = family
  out = models.save_hf(cfg, params, str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 17))
  ours = np.asarray(models.forward(cfg, params, jnp.asarray(tokens)))
  assert np.abs(ours - torch_logits(reloaded, tokens)).max() <= ATOL
  cfg2, params2 = models.load_hf(out)
  assert cfg2 == cfg
  np.testing.assert_array_equal(np.asarray(models.forward(cfg2, params2, jnp.asarray(tokens))), ours)


def test_sharded_index_checkpoint_loads(family, tmp_path):
  name, torch_model, cfg, params, _ = family
  out = models.save_hf(cfg, params, str(tmp_path / "sharded"), max_shard_bytes=40_000)
  import json, os
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 2
  assert not os.path.exists(os.path.join(out, "model.safetensors"))
  cfg2, params2 = models.load_hf(out)
  tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 9))
  np.testing.assert_allclose(np.asarray(models.forward(cfg2, params2, jnp.asarray(tokens))),
                             torch_logits(torch_model, tokens), atol=ATOL)
