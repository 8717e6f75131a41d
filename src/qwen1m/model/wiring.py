"""What a model is built with besides its configs and weights, passed in at construction.

The loader, ``engine.builder.build_rank`` and the tensor-parallel ranks (``parallel.runtime``,
``parallel.worker``) hand one ``ModelWiring`` down to ``Qwen2ForCausalLM``, which keeps the
collectives and gives the rest to its attention backend. Nothing is set on a model after it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen1m.attention.calibrate import RecallProbe
from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.attention.metadata import AttentionMetadata
from qwen1m.attention.sparse_prefill import SparseTelemetry


@dataclass(frozen=True, slots=True)
class ModelWiring:
    """The defaults are one device, the kernels chosen per device, no reports."""

    # tensor parallelism: sums a row-parallel layer's partial outputs (o_proj, down_proj) over the ranks
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the tensor-parallel driver: sends each step to the other ranks before running it
    before_forward: Callable[[torch.Tensor, AttentionMetadata], None] | None = None
    kernels: KernelChoice | None = None  # None: a fresh KernelChoice for the backend
    telemetry: SparseTelemetry | None = None  # sparse prefill density / recall reports
    probe: RecallProbe | None = None  # ``qwen1m calibrate``: dense prefill, sparse recall measured
