"""Bad checkpoints: missing / mis-shaped / unexpected tensors, pickle-only dirs, vocab mismatch."""
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cotsafe_jax import CotsafeError, models
from tests.models.hf_fixtures import make_hf_model


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("qwen3")
  make_hf_model("qwen3", str(d))
  return str(d)


def _rewrite(src, dst, edit):
  import shutil
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(dst, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst


def test_missing_tensor_named(ckpt_dir, tmp_path):
  d = _rewrite(ckpt_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
  with pytest.raises(CotsafeError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_norm\.weight"):
    models.load_hf(d)


def test_misshaped_tensor_named(ckpt_dir, tmp_path):
  def edit(t):
    t["model.layers.0.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
  d = _rewrite(ckpt_dir, tmp_path / "m", edit)
  with pytest.raises(CotsafeError, match=r"mis-shaped tensors: model\.layers\.0\.mlp\.up_proj\.weight "
                                         r"\[95, 64\] \(expected \[96, 64\]\)"):
    models.load_hf(d)


def test_unexpected_tensor_named(ckpt_dir, tmp_path):
  def edit(t):
    t["model.layers.0.extra.weight"] = np.zeros((2,), np.float32)
  d = _rewrite(ckpt_dir, tmp_path / "m", edit)
  with pytest.raises(CotsafeError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
    models.load_hf(d)


def test_pickle_only_dir_refused(ckpt_dir, tmp_path):
  import shutil
  d = tmp_path / "m"
  shutil.copytree(ckpt_dir, d)
  os.rename(d / "model.safetensors", d / "pytorch_model.bin")
  with pytest.raises(CotsafeError, match="pickle checkpoints are never loaded"):
    models.load_hf(str(d))


def test_tokenizer_vocab_larger_than_model_is_error(tmp_path):
  from tokenizers import Tokenizer, models as tm, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(tm.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel()
  tok.train_from_iterator(["hello world, a tiny corpus for a tiny tokenizer"] * 20,
                          trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok)
  fast.save_pretrained(str(tmp_path / "tok"))
  n = len(models.load_tokenizer(str(tmp_path / "tok")))
  models.load_tokenizer(str(tmp_path / "tok"), model_vocab_size=n)
  with pytest.raises(CotsafeError, match=f"tokenizer has {n} tokens but the model's vocab_size is {n - 1}"):
    models.load_tokenizer(str(tmp_path / "tok"), model_vocab_size=n - 1)
  with pytest.raises(CotsafeError, match="tokenizer dir not found"):
    models.load_tokenizer(str(tmp_path / "missing"))
