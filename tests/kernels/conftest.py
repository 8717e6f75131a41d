"""Kernel tests run Triton through its interpreter on the CPU unless a CUDA GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here and not in the tests.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
