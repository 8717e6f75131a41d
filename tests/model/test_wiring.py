"""A model gets its collectives, kernel choice and reports at construction (``ModelWiring``): nothing
is set on a built model. (Through LLM: tests/attention/test_sparse_model.py reads the telemetry, and
tests/parallel the collectives.)"""

from __future__ import annotations

import torch
from checkpoints import save_tiny_checkpoint

from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.attention.sparse_prefill import SparseTelemetry
from qwen1m.config import load_model_config
from qwen1m.model.loader import load_model
from qwen1m.model.wiring import ModelWiring


def test_wiring_reaches_the_model_and_its_backend(tmp_path):
    """load_model hands the wiring to the model: the TP hooks are called on every forward, and the
    backend holds the kernel choice and telemetry it was given (its own, not a shared one)."""
    folder = save_tiny_checkpoint(tmp_path / "m", seed=3)
    cfg = load_model_config(folder)
    sent, reduced = [], []
    choice, telemetry = KernelChoice(decode_kernel=False), SparseTelemetry()
    wiring = ModelWiring(all_reduce=lambda x: reduced.append(x.shape) or x,
                         before_forward=lambda ids, meta: sent.append(ids.tolist()), kernels=choice,
                         telemetry=telemetry)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"), wiring=wiring)
    assert model.backend.kernels is choice and model.backend.telemetry is telemetry
    assert model.backend.probe is None
    plain = load_model(folder, cfg, torch.float32, torch.device("cpu"))
    assert plain.all_reduce is None and plain.before_forward is None and plain.backend.telemetry is None
    assert plain.backend.kernels is not choice and plain.backend.kernels.sparse_batched

    from qwen1m.attention.metadata import AttentionMetadata, SequenceSlice
    from qwen1m.cache.paged_kv import PagedKVCache, SequenceBlocks

    cache = PagedKVCache(cfg.num_hidden_layers, 4, 4, cfg.num_key_value_heads, cfg.head_dim, torch.float32,
                         torch.device("cpu"))
    ids = torch.tensor([5, 6, 7])
    blocks = SequenceBlocks(cache, [0], torch.device("cpu"))
    meta = AttentionMetadata(torch.arange(3), [SequenceSlice(0, 3, 0, 3, blocks, 3)])
    with torch.inference_mode():
        model(ids, meta)
    assert sent == [[5, 6, 7]]
    assert len(reduced) == 2 * cfg.num_hidden_layers  # after o_proj and after down_proj, every layer

