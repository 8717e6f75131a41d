"""Shared test setup: the Triton interpreter on CPU, helper modules on sys.path, a tiny checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run through the interpreter on CPU-only machines. It must be set before anything
# imports triton, so here, at the root, before test modules (which may import kernels) are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (checkpoints, tokenizer_utils)

from checkpoints import save_tiny_checkpoint  # noqa: E402


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny")
