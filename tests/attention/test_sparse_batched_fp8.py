"""The batched sparse prefill with FP8 attention (attention_dtype="fp8"): both of its attention kernels
read e4m3, the estimate, indices and dense decisions are unchanged, and the output stays within the
e4m3 bound of tests/kernels/test_flash_attn_fp8.py.

Reference: the same batched path in float32 on the dequantised inputs (queries, K and V rounded as
the FP8 path rounds them; the estimate then sees the same K, so both runs attend the same indices).
The FP8 run differs only by its P rounding, so per row, with the merge weights from LSEs that agree
to 1e-4,

    |out - ref| <= 2^-4 * (the same path with |V|) + n_kv * 2^-18 * max|v|,   mean error < half of it.

CPU: the Triton kernels under TRITON_INTERPRET=1 at tiny sizes with several DCA pieces.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_sparse_batched import DCA, D, _cfg, _inputs, needs_triton

from qwen1m.attention import sparse_batched
from qwen1m.attention.fp8 import quantize
from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.attention.reference import attend
from qwen1m.attention.sparse_prefill import sparse_prefill_attention


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return quantize(x).dequantize()


def _run(queries, k, v, begin, dca, cfg, *, fp8_kv=None, kernels=None, batched=True, attend_fn=attend, stats=None):
    return sparse_prefill_attention(
        queries, k, v, begin=begin, chunk_len=dca.chunk_len if dca else None, softmax_scale=1 / math.sqrt(D),
        vertical_sizes=[3, 5, 0, 7], slash_sizes=[4, 2, 6, 0], cfg=cfg, attend_fn=attend_fn, batched=batched,
        kernels=kernels, fp8_kv=fp8_kv, stats=stats)


@needs_triton
@pytest.mark.parametrize("dca,begin", [(DCA, 0), (DCA, 37), (None, 21)])
@pytest.mark.parametrize("dense_above", [1.0, 0.5])
def test_fp8_batched_sparse_within_the_e4m3_bound(dca, begin, dense_above, monkeypatch):
    queries, k, v = _inputs(167, begin, dca, seed=3)
    v = v * (0.2 + 2 * torch.rand(v.shape[0], v.shape[1], 1, generator=torch.Generator().manual_seed(1)))
    queries = {name: _rounded(q) for name, q in queries.items()}
    k, v = _rounded(k), _rounded(v)
    cfg = _cfg(4, 4, dense_above_density=dense_above)
    seen = []
    real = sparse_batched._attend_group

    def spy(*args, **kwargs):
        seen.append(kwargs["attn"][3] is not None and kwargs["attn"][0].dtype == torch.float8_e4m3fn)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_batched, "_attend_group", spy)
    s_ref, s_got = {}, {}
    ref, ref_lse = _run(queries, k, v, begin, dca, cfg, stats=s_ref)
    got, got_lse = _run(queries, k, v, begin, dca, cfg, fp8_kv=lambda: (quantize(k), quantize(v)), stats=s_got)
    abs_ref, _ = _run(queries, k, v.abs(), begin, dca, cfg)
    assert seen and seen.count(True) == len(seen) // 2  # the FP8 run's groups, and only those
    assert int(s_got["computed"]) == int(s_ref["computed"])  # the same indices and dense decisions
    bound = 2.0 ** -4 * abs_ref + k.shape[0] * 2.0 ** -18 * v.abs().max() + 1e-6
    err = (got - ref).abs()
    assert (err / bound).max() <= 1.0, f"out error {(err / bound).max():.3g}x the e4m3 bound"
    assert err.mean() / bound.mean() < 0.5  # rounding noise, not a misplaced scale
    assert (got_lse - ref_lse).abs().max() <= 1e-4
    assert not torch.equal(got, ref)  # P really rounded


@needs_triton
def test_fp8_sparse_kernels_that_cannot_be_built_fall_back_to_the_model_dtype(monkeypatch, caplog):
    """A compile failure in the FP8 variants turns off only ``sparse_fp8``: the batched path stays on
    and gives the model-dtype result; the K/V quantisation is not even asked for afterwards."""
    from triton.runtime.errors import OutOfResources

    begin = 21
    queries, k, v = _inputs(167, begin, None, seed=4)
    cfg = _cfg(4, 4)
    ref = _run(queries, k, v, begin, None, cfg)
    real = sparse_batched._attend_group

    def no_fp8(*args, **kwargs):
        if kwargs["attn"][3] is not None:
            raise OutOfResources(232448, 101376, "shared memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_batched, "_attend_group", no_fp8)
    monkeypatch.setattr("qwen1m.attention.sparse_prefill._use_batched", lambda *a: True)
    asked = []

    def fp8_kv():
        asked.append(1)
        return quantize(k), quantize(v)

    choice = KernelChoice(prefill_fp8=True)
    with caplog.at_level(logging.WARNING):
        got = _run(queries, k, v, begin, None, cfg, fp8_kv=fp8_kv, kernels=choice, batched=None)
        again = _run(queries, k, v, begin, None, cfg, fp8_kv=fp8_kv, kernels=choice, batched=None)
    assert not choice.sparse_fp8 and choice.sparse_batched and asked == [1]
    assert "sparse_fp8 kernel cannot be built here (OutOfResources" in caplog.text
    assert torch.equal(got[0], ref[0]) and torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])
