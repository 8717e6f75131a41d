"""Shared fixtures: the bundled model's tokenizer and an eval context, built once per session."""

from __future__ import annotations

import pytest

from qwen1m.eval.context import EvalContext
from qwen1m.llm import bundled_model_path
from qwen1m.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def heldout_ec() -> EvalContext:
    return EvalContext.build(Tokenizer.from_folder(bundled_model_path()).backend)


@pytest.fixture(scope="session")
def ec(heldout_ec) -> EvalContext:
    """The eval default: held-out families and phrasings."""
    return heldout_ec


@pytest.fixture(scope="session")
def train_ec(heldout_ec) -> EvalContext:
    """The same tokenizer and corpus with the training templates (``--families train``)."""
    return EvalContext(heldout_ec.enc, heldout_ec.ctx, families="train")
