"""Shared fixtures: the bundled model's tokenizer and an eval context, built once per session."""

from __future__ import annotations

import pytest

from qwen1m.eval.context import EvalContext
from qwen1m.llm import bundled_model_path
from qwen1m.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def ec() -> EvalContext:
    return EvalContext.build(Tokenizer.from_folder(bundled_model_path()).backend)
