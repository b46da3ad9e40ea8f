"""rollout.generate_text: chat template in thinking format, batched generation, decoded reasoning / answer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cotsafe_jax import models, rollout

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
COMPLETION = "plan</think>ok"  # no repeated token: a bigram model can spell it


@pytest.fixture(scope="module")
def tokenizer():
  from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(tm.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["how many apples does tom have", "plan ok hello there"] * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<pad>")
  fast.chat_template = TEMPLATE
  return fast


def _chain_model(tokenizer):
  """A model whose next token is a fixed function of the current one: '\\n' -> COMPLETION -> <|end|>.

  The embedding rows are random unit-scale vectors; lm_head column of each successor is its predecessor's
  embedding, so after the (norm-preserving, near-identity) layers the successor's logit dominates.
  """
  chain = [tokenizer.encode("\n")[-1]] + tokenizer.encode(COMPLETION) + [tokenizer.eos_token_id]
  assert len(set(chain)) == len(chain), chain
  cfg = models.tiny_config("qwen2", vocab_size=320, hidden_size=64, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2)
  params = models.init_params(cfg, jax.random.key(0))
  embed = np.asarray(jax.random.normal(jax.random.key(1), (cfg.vocab_size, cfg.hidden_size)))
  lm_head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
  for a, b in zip(chain, chain[1:]):
    lm_head[:, b] = 3.0 * embed[a] / np.linalg.norm(embed[a])
  return cfg, {**params, "embed": jnp.asarray(embed), "lm_head": jnp.asarray(lm_head)}


def test_generate_text_thinking_format_reasoning_and_answer(tokenizer):
  cfg, params = _chain_model(tokenizer)
  prompts = ["how many apples", [{"role": "user", "content": "hello there tom, how many"}]]
  rows = rollout.generate_text(cfg, params, tokenizer, prompts, rng=jax.random.key(0), max_new_tokens=12,
                               temperature=0.0)
  assert [r.prompt for r in rows] == ["<|user|>how many apples<|assistant|><think>\n",
                                      "<|user|>hello there tom, how many<|assistant|><think>\n"]
  n = len(tokenizer.encode(COMPLETION)) + 1  # the stop token counts
  for r in rows:
    assert r.response == "<think>\n" + COMPLETION
    assert (r.reasoning, r.answer) == ("plan", "ok")
    assert r.finished and r.num_tokens == n

  # the helper's batch is the template text tokenised and left-padded: generate on it directly agrees
  texts, prompt_bp, mask_bp = rollout.encode_chat(tokenizer, prompts, pad_id=tokenizer.pad_token_id)
  ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
  assert prompt_bp[0, -len(ids):].tolist() == ids and mask_bp[0].sum() == len(ids)
  assert not mask_bp[0, :-len(ids)].any() and mask_bp[1].all()
  out = rollout.generate(cfg, params, prompt_bp, mask_bp, rng=jax.random.key(0), max_new_tokens=12,
                         temperature=0.0, eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
  expected = tokenizer.encode(COMPLETION) + [tokenizer.eos_token_id]
  assert np.asarray(out.tokens_bt)[:, :n].tolist() == [expected, expected]
  assert (np.asarray(out.tokens_bt)[:, n:] == tokenizer.pad_token_id).all()


def test_generate_text_out_of_budget_is_all_reasoning(tokenizer):
  cfg, params = _chain_model(tokenizer)
  (row,) = rollout.generate_text(cfg, params, tokenizer, ["how many apples"], rng=jax.random.key(0),
                                 max_new_tokens=1, temperature=0.0)
  first = tokenizer.decode(tokenizer.encode(COMPLETION)[:1])
  assert first and "</think>" not in first
  assert not row.finished and row.num_tokens == 1
  assert (row.response, row.reasoning, row.answer) == ("<think>\n" + first, first, "")
