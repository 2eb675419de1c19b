"""Fixtures the server tests share: the tiny tokenizer and the word tokens a FakeEngine draws from."""
import pytest

from fake_engine import tiny_tokenizer, word_tokens


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pool(tok):
    return word_tokens(tok)
