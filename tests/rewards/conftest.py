"""Shared fixtures for tests/rewards: one tokenizer per session (training it takes ~0.1 s)."""
import pytest

from tests.rewards import rewards_testlib


@pytest.fixture(scope="session")
def bpe_tokenizer():
  return rewards_testlib.make_tokenizer(rewards_testlib.corpus(), vocab_size=512)
