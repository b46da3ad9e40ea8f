"""ModelConfig.from_hf: transformers 4 and 5 layouts, and clear errors for what we don't support."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import CotsafeError, models
from tests.models.hf_fixtures import make_hf_model


def _t4_layout(t5: dict) -> dict:
  """The layout published checkpoints carry: rope_theta + rope_scaling ("type" key), no rope_parameters."""
  t4 = {k: v for k, v in t5.items() if k not in ("rope_parameters", "layer_types")}
  rope = t5["rope_parameters"]
  t4["rope_theta"] = rope["rope_theta"]
  if rope.get("rope_type", "default") != "default":
    t4["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items()
                                                        if k not in ("rope_type", "rope_theta")}}
  else:
    t4["rope_scaling"] = None
  t4["torch_dtype"] = "float32"
  return t4


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_t4_layout_gives_same_model_as_t5(family, tmp_path):
  make_hf_model(family, str(tmp_path / "m"))
  t5 = json.load(open(tmp_path / "m" / "config.json"))
  assert "rope_parameters" in t5
  cfg5 = models.ModelConfig.from_hf(str(tmp_path / "m"))
  cfg4 = models.ModelConfig.from_hf(_t4_layout(t5))
  assert cfg4 == cfg5
  if family == "llama":
    assert cfg5.rope_scaling_dict["factor"] == 8.0 and cfg5.rope_theta == 50000.0
  if family == "qwen2":
    assert cfg5.qkv_bias and not cfg5.o_bias
  if family == "qwen3":
    assert cfg5.qk_norm and cfg5.head_dim == 24
  assert cfg5.num_kv_heads == 2 and cfg5.num_heads == 4


def test_t4_layout_dir_loads_with_same_logits(tmp_path):
  make_hf_model("llama", str(tmp_path / "m"))
  cfg5, params5 = models.load_hf(str(tmp_path / "m"))
  t5 = json.load(open(tmp_path / "m" / "config.json"))
  json.dump(_t4_layout(t5), open(tmp_path / "m" / "config.json", "w"))
  cfg4, params4 = models.load_hf(str(tmp_path / "m"))
  tokens = jnp.arange(40)[None] % cfg4.vocab_size
  np.testing.assert_array_equal(np.asarray(models.forward(cfg4, params4, tokens)),
                                np.asarray(models.forward(cfg5, params5, tokens)))


BASE = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("patch,message", [
    (dict(model_type="mixtral"), "unknown model_type 'mixtral' in config (supported: llama, qwen2, qwen3)"),
    (dict(use_sliding_window=True, sliding_window=4), "sliding window"),
    (dict(layer_types=["sliding_attention"]), "sliding window"),
    (dict(num_experts=8), "mixture-of-experts (num_experts=8) is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn' is not supported "
                                                              "(supported: default, llama3)"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(hidden_size=None), "field 'hidden_size' missing"),
])
def test_unsupported_configs_are_clear_errors(patch, message):
  with pytest.raises(CotsafeError) as e:
    models.ModelConfig.from_hf({**BASE, **patch})
  assert message in str(e.value)
  assert str(e.value).startswith("cotsafe_jax: ")


def test_unknown_model_type_in_dir_names_the_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
  with pytest.raises(CotsafeError, match=f"unknown model_type 'gpt2' in {tmp_path}/config.json"):
    models.ModelConfig.from_hf(str(tmp_path))


def test_missing_path_is_clear_error(tmp_path):
  with pytest.raises(CotsafeError, match="model dir not found"):
    models.load_hf(str(tmp_path / "nope"))
  with pytest.raises(CotsafeError, match="config.json: not found"):
    models.ModelConfig.from_hf(str(tmp_path))


def test_num_params_matches_param_tree():
  for fam in ("llama", "qwen2", "qwen3"):
    cfg = models.tiny_config(fam, vocab_size=77, tie_word_embeddings=fam == "llama")
    shapes = models.param_shapes(cfg)
    assert cfg.num_params == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
