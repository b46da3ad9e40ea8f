"""Chat template in thinking format and the reasoning / answer split (docs/data.md)."""
import pytest

from cotsafe_jax import models


@pytest.mark.parametrize("text,reasoning,answer", [
    ("<think>\nstep one\nstep two\n</think>\n\nthe answer is 4", "step one\nstep two", "the answer is 4"),
    ("step one\n</think>\n\nfinal", "step one", "final"),           # template opened <think> in the prompt
    ("<think>\nstill thinking", "still thinking", ""),               # no closing tag: all reasoning
    ("plain answer with no tags", "plain answer with no tags", ""),
    ("<think></think>answer", "", "answer"),
])
def test_split_reasoning(text, reasoning, answer):
  assert models.split_reasoning(text) == (reasoning, answer)


def test_apply_chat_template_opens_think_block(tmp_path):
  from tokenizers import Tokenizer, models as tm, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(tm.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel()
  tok.train_from_iterator(["user assistant think"] * 5, trainers.BpeTrainer(
      vocab_size=280, special_tokens=["<|user|>", "<|assistant|>", "<think>", "</think>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok)
  fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  fast.save_pretrained(str(tmp_path))
  loaded = models.load_tokenizer(str(tmp_path))
  text = models.apply_chat_template(loaded, "how many?")
  assert text == "<|user|>how many?<|assistant|><think>\n"
  assert models.apply_chat_template(loaded, [{"role": "user", "content": "x"}], thinking=False) == \
      "<|user|>x<|assistant|>"
