"""Offline tokenizers for data tests: the presets' byte-level tokenizer, with and without a chat template."""

import pytest

from reflow.models.tokenizer import build_byte_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level tokenizer with a ChatML-style chat template."""
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_no_template():
    """Same tokenizer without a chat template, for the 'messages' error path."""
    tok = build_byte_tokenizer()
    tok.chat_template = None
    return tok
