"""SFT row encoding under a chat template that drops assistant reasoning (DeepSeek-R1-Distill's): `messages`
rows are refused with a one-line error naming the row; `prompt` + `response` rows keep the reasoning."""

import pytest

from cotsafe_jax import CotsafeError, models
from cotsafe_jax.train import sft_trainer as st
from tests.rewards.rewards_testlib import corpus, make_tokenizer

BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
# DeepSeek-R1-Distill-Qwen's template, reduced to the parts that matter here (no tools): an assistant
# message keeps only what follows its last </think>; the generation prompt opens the think block.
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
# the same template with the one change that keeps reasoning: the assistant content as it is
KEEPING_TEMPLATE = R1_DISTILL_TEMPLATE.replace(
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}", "")
RESPONSE = "<think>\nadd 2 and 3. 2 + 3 = 5.\n</think>\n\nthe answer is 5."


@pytest.fixture(scope="module")
def tok():
  t = make_tokenizer(corpus(200), vocab_size=400)
  t.add_special_tokens({"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [USER, ASSISTANT]})
  t.chat_template = R1_DISTILL_TEMPLATE
  return t


def _targets(tok, ids, target):
  return tok.decode([i for i, m in zip(ids, target) if m], skip_special_tokens=False)


def test_template_really_strips_reasoning(tok):
  rendered = tok.apply_chat_template([{"role": "user", "content": "2 + 3?"},
                                      {"role": "assistant", "content": RESPONSE}], tokenize=False)
  assert rendered == f"{BOS}{USER}2 + 3?{ASSISTANT}\n\nthe answer is 5.{EOS}"


def test_messages_row_whose_reasoning_the_template_drops_is_refused(tok):
  row = {"id": "ex-7", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."},
                                    {"role": "user", "content": "2 + 3?"},
                                    {"role": "assistant", "content": RESPONSE}]}
  with pytest.raises(CotsafeError) as e:
    st.encode_rows(tok, [{"messages": row["messages"][:2]}, row], max_len=128, source="data/sft.jsonl")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("cotsafe_jax: data/sft.jsonl: row 2 (id ex-7): message 4 (assistant): the tokenizer's chat template "
                        "drops the reasoning")
  assert "prompt + response" in msg  # how to keep it


def test_prompt_response_row_keeps_the_reasoning(tok):
  ids, target = st.encode_row(tok, {"prompt": "2 + 3?", "response": RESPONSE})
  prefix = models.apply_chat_template(tok, "2 + 3?")
  assert prefix == f"{BOS}{USER}2 + 3?{ASSISTANT}<think>\n"
  assert tok.decode(ids, skip_special_tokens=False) == prefix + RESPONSE[len("<think>\n"):] + EOS
  # the whole chain of thought is trained on: everything after the opened think block, through the eos
  assert _targets(tok, ids, target) == RESPONSE[len("<think>\n"):] + EOS


def test_rows_without_reasoning_and_keeping_templates_are_accepted(tok, tmp_path):
  plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."}]
  ids, target = st.encode_row(tok, {"messages": plain})
  assert _targets(tok, ids, target) == "hello." + EOS
  # an answer after an empty think block has no reasoning to lose
  empty = [plain[0], {"role": "assistant", "content": "<think>\n\n</think>\n\nhello."}]
  ids, target = st.encode_row(tok, {"messages": empty})
  assert _targets(tok, ids, target) == "\n\nhello." + EOS

  tok.save_pretrained(str(tmp_path))
  keeping = models.load_tokenizer(str(tmp_path))
  keeping.chat_template = KEEPING_TEMPLATE
  row = {"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": RESPONSE}]}
  ids, target = st.encode_row(keeping, row)
  # the generation prompt opened the think block, so the target starts inside it, as for prompt + response
  assert _targets(keeping, ids, target) == RESPONSE[len("<think>\n"):] + EOS
