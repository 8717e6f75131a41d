"""Shared fixtures: one small tokenizer and task context, built once per test session."""

from __future__ import annotations

import pytest

from qwen1m.train.corpus import build_corpus
from qwen1m.train.encoding import Encoder
from qwen1m.train.tasks import TaskContext, tokenizer_texts
from qwen1m.train.tokenizer_train import train_tokenizer


@pytest.fixture(scope="session")
def small_ctx() -> TaskContext:
    paragraphs = build_corpus(seed=0, num_grammar=400, stdlib=False)
    tok = train_tokenizer(tokenizer_texts(paragraphs, repeats=5), vocab_size=768)
    return TaskContext.build(Encoder(tok), paragraphs)
