"""The batched sparse prefill (every piece and DCA region in one index launch and one attention launch)
equals the per-region path: exact indices, equal outputs, equal dense decisions and telemetry.

CPU: the Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py), float32, tiny sizes with several
DCA pieces (a step that starts mid chunk, a short last piece, inter regions). GPU (-m gpu): one sparse
prefill step runs under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up: no host sync.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import pytest
import torch

from qwen1m.attention.dca import dca_attention
from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.attention.reference import attend
from qwen1m.attention.sparse_batched import _problems, _rebase
from qwen1m.attention.sparse_prefill import _region_index, sparse_prefill_attention
from qwen1m.config import DCAConfig
from qwen1m.rope import RotaryEmbedding, dca_positions
from qwen1m.sparse_config import SparseConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="the Triton kernels: CUDA or TRITON_INTERPRET=1")
H, KVH, D = 4, 2, 16
DCA = DCAConfig(48, 8)  # s = 40: a 130-token step from 37 has pieces of 3, 40, 40, 40 and 7 queries


def _inputs(total, begin, dca, device="cpu", dtype=torch.float32, seed=0, heads=H, kv_heads=KVH, head_dim=D):
    g = torch.Generator(device=device).manual_seed(seed)
    rotary = RotaryEmbedding(head_dim, 10000.0)
    q = torch.randn(total, heads, head_dim, generator=g, device=device)
    k = torch.randn(total, kv_heads, head_dim, generator=g, device=device)
    v = torch.randn(total, kv_heads, head_dim, generator=g, device=device).to(dtype)
    if dca is None:
        pos = torch.arange(total, device=device)
        return {"intra": rotary.rotate(q, pos)[begin:].to(dtype)}, rotary.rotate(k, pos).to(dtype), v
    pos = dca_positions(torch.arange(total, device=device), dca)
    k = rotary.rotate(k, pos.key).to(dtype)
    queries = {name: rotary.rotate(q, getattr(pos, name))[begin:].to(dtype)
               for name in ("intra", "succ", "inter", "succ_critical", "inter_critical")}
    return queries, k, v


def _cfg(vertical, slash, **kw):
    return SparseConfig.uniform(1, H, vertical, slash, last_q=8, block_size=16, sink_tokens=2,
                                local_diagonals=3, **kw)


def _run(queries, k, v, begin, dca, cfg, batched, attend_fn=None, stats=None, kernels=None):
    return sparse_prefill_attention(
        queries, k, v, begin=begin, chunk_len=dca.chunk_len if dca else None, softmax_scale=1 / math.sqrt(D),
        vertical_sizes=[3, 5, 0, 7], slash_sizes=[4, 2, 6, 0], cfg=cfg, attend_fn=attend_fn, stats=stats,
        batched=batched, kernels=kernels)


@needs_triton
@pytest.mark.parametrize("begin", [0, 37])
def test_batched_index_equals_per_region_index(begin):
    """Re-base + one batched index launch == ``_region_index`` (the PyTorch builder) per region, exactly."""
    from qwen1m.kernels.vs_index import build_vertical_slash_index_batched

    total, cfg = 167, _cfg(4, 4)
    pieces, problems = _problems(begin, total, DCA.chunk_len)
    g = torch.Generator().manual_seed(5)
    v_idx = torch.stack([torch.randint(-1, pe, (H, 6), generator=g) for _, pe in pieces])
    s_idx = torch.stack([torch.randint(-1, pe, (H, 5), generator=g) for _, pe in pieces])
    v_idx[0, 1] = -1  # a head without picks: the empty-region fallback columns
    s_idx[0, 1] = -1
    rows = [[p, a, b, pieces[p][1], pieces[p][1] - pieces[p][0], b - a, int(c),
             *torch.linspace(0, b - a - 1, cfg.empty_region_columns).long().tolist()]
            for p, _, _, a, b, c in problems]
    table = torch.tensor(rows)
    cols, d = _rebase(v_idx, s_idx, table[:, :7], table[:, 7:], cfg.empty_region_columns)
    shapes = [(pieces[p][1] - pieces[p][0], b - a, c) for p, _, _, a, b, c in problems]
    batched = build_vertical_slash_index_batched(cols, d, shapes, block_m=16, block_n=16)
    assert len(problems) == 12  # 5 intra, 4 succ, 3 inter
    for j, (p, _, _, a, b, causal) in enumerate(problems):
        ref = _region_index(v_idx[p], s_idx[p], a, b, *pieces[p], causal, cfg, KernelChoice())
        got = batched.problem(j)
        assert torch.equal(got.block_count, ref.block_count) and torch.equal(got.column_count, ref.column_count)
        for h in range(H):
            for m in range(ref.block_count.shape[1]):
                nb, nc = int(ref.block_count[h, m]), int(ref.column_count[h, m])
                assert torch.equal(got.block_offset[h, m, :nb], ref.block_offset[h, m, :nb])
                assert torch.equal(got.column_index[h, m, :nc], ref.column_index[h, m, :nc])


@needs_triton
@pytest.mark.parametrize("dca,begin", [(DCA, 0), (DCA, 37), (None, 21)])
@pytest.mark.parametrize("dense_above", [1.0, 0.5])
def test_batched_equals_per_region(dca, begin, dense_above):
    """Small budgets (really sparse): same output, LSE and density telemetry as the per-region path;
    with dense_above 0.5 some regions go dense (flash_attn_problems vs attend_fn)."""
    total = 167
    queries, k, v = _inputs(total, begin, dca)
    cfg = _cfg(4, 4, dense_above_density=dense_above)
    s_ref, s_got = {}, {}
    dense_calls = []

    def counting_attend(*args, **kwargs):  # the per-region path's dense regions
        dense_calls.append(1)
        return attend(*args, **kwargs)

    ref, ref_lse = _run(queries, k, v, begin, dca, cfg, batched=False, attend_fn=counting_attend, stats=s_ref)
    got, got_lse = _run(queries, k, v, begin, dca, cfg, batched=True, attend_fn=attend, stats=s_got)
    assert torch.allclose(got, ref, atol=2e-5) and torch.allclose(got_lse, ref_lse, atol=2e-5)
    assert int(s_got["computed"]) == s_ref["computed"] and s_got["causal"] == s_ref["causal"]
    assert s_ref["computed"] < s_ref["causal"]  # some regions sparse
    if dense_above == 1.0:
        assert s_ref["computed"] < 0.6 * s_ref["causal"] and not dense_calls
    elif dca is not None:  # 12 regions, some dense: both kernels of the batched path ran
        assert dense_calls


@needs_triton
@pytest.mark.parametrize("dca,begin", [(DCA, 37), (None, 21)])
def test_batched_triton_estimate_equals_per_region(dca, begin, monkeypatch):
    """With the Triton sums (as on CUDA): the batched estimate (one launch per pass for all pieces)
    gives the per-region path's picks, so the same output, LSE and telemetry."""
    from qwen1m.attention import sparse_batched, sparse_estimate

    monkeypatch.setattr(sparse_estimate, "_triton_supported", lambda *a: True)
    calls = []
    batched = sparse_estimate.estimate_vertical_slash_batched

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return batched(*args, **kwargs)

    monkeypatch.setattr(sparse_batched, "estimate_vertical_slash_batched", spy)
    queries, k, v = _inputs(167, begin, dca, seed=2)
    cfg = _cfg(4, 4, dense_above_density=1.0)
    s_ref, s_got = {}, {}
    choice = KernelChoice()
    ref, ref_lse = _run(queries, k, v, begin, dca, cfg, batched=False, attend_fn=attend, stats=s_ref, kernels=choice)
    got, got_lse = _run(queries, k, v, begin, dca, cfg, batched=True, attend_fn=attend, stats=s_got, kernels=choice)
    assert calls == [5 if dca else 1] and choice.sparse_sums  # one call, every piece
    assert torch.allclose(got, ref, atol=2e-5) and torch.allclose(got_lse, ref_lse, atol=2e-5)
    assert int(s_got["computed"]) == s_ref["computed"] and s_got["causal"] == s_ref["causal"]


@needs_triton
@pytest.mark.parametrize("begin", [0, 37])
def test_batched_full_budgets_equal_dense_dca(begin):
    total = 167
    queries, k, v = _inputs(total, begin, DCA, seed=1)
    cfg = _cfg(total, total, dense_above_density=1.0)
    out, lse = sparse_prefill_attention(
        queries, k, v, begin=begin, chunk_len=DCA.chunk_len, softmax_scale=0.25, vertical_sizes=[total] * H,
        slash_sizes=[total] * H, cfg=cfg, batched=True)
    ref, ref_lse = dca_attention(queries["intra"], queries["succ"], queries["inter"], k, v, begin=begin, dca=DCA,
                                 softmax_scale=0.25)
    assert torch.allclose(out, ref, atol=2e-5) and torch.allclose(lse, ref_lse, atol=2e-5)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dca", [DCAConfig(4096, 128), None])
def test_sparse_prefill_step_makes_no_host_sync(dca):
    """One sparse prefill step (a 32K chunk at the end of a 96K prompt: 9 DCA pieces, inter regions,
    some regions dense) runs with no host synchronisation once compiled."""
    total, begin, heads, kv_heads, head_dim = 98304, 65536, 28, 4, 128
    queries, k, v = _inputs(total, begin, dca, device="cuda", dtype=torch.bfloat16, heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim)
    from qwen1m.attention.ops import get_attend_fn, get_merge_fn

    def step(cfg):
        stats = {}
        out, _ = sparse_prefill_attention(
            queries, k, v, begin=begin, chunk_len=dca.chunk_len if dca else None, softmax_scale=head_dim ** -0.5,
            vertical_sizes=[1000] * heads, slash_sizes=[2048] * heads, cfg=cfg, merge_fn=get_merge_fn(k.device),
            attend_fn=get_attend_fn(k.device), stats=stats, batched=True)
        return out, stats

    # random inputs have no sparse structure: with dense regions allowed (0.6) the device decides every
    # region dense (measured on an H100: computed == causal); every region sparse (1.0) runs the sparse
    # kernel on all of them. Both must run without a host sync.
    base = SparseConfig.uniform(1, heads, 1000, 2048)
    for above in (base.dense_above_density, 1.0):
        cfg = dataclasses.replace(base, dense_above_density=above)
        out, stats = step(cfg)  # warm-up: compilation, autotuning
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out2, stats2 = step(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        # the estimate's slash sums use atomics (order-dependent last bits): equal up to rare top-k ties
        assert (out.float() - out2.float()).abs().max() < 0.05
        for st in (stats, stats2):
            assert 0 < int(st["computed"]) <= st["causal"]
            if above == 1.0:
                assert int(st["computed"]) < st["causal"]


def _auto_on_cpu(monkeypatch):
    """batched=None picks the batched path as on CUDA (while the caller's KernelChoice has it); counts its calls."""
    from qwen1m.attention import sparse_batched, sparse_prefill

    monkeypatch.setattr(sparse_prefill, "_use_batched", lambda q, k, cfg, kernels: kernels.sparse_batched)
    calls = []
    real = sparse_batched.sparse_prefill_batched

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_batched, "sparse_prefill_batched", counted)
    return calls


def _fail_groups(monkeypatch, error: Exception, times: int) -> None:
    """The first ``times`` calls of the batched path fail after its estimate and slots are allocated."""
    from qwen1m.attention import sparse_batched

    real, left = sparse_batched._attend_group, [times]

    def failing(*args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_batched, "_attend_group", failing)


@needs_triton
def test_out_of_memory_in_the_batched_path_falls_back_for_that_call_only(monkeypatch, caplog):
    """An OOM computes that call per region (same result and telemetry as batched=False), keeps the batched
    path on, warns once with the shapes and the workspace; the next call runs batched; by name it raises."""
    from qwen1m.attention import sparse_prefill

    begin, total = 37, 167
    queries, k, v = _inputs(total, begin, DCA)
    cfg = _cfg(4, 4, dense_above_density=0.5)
    s_ref, s_bat = {}, {}
    ref = _run(queries, k, v, begin, DCA, cfg, batched=False, attend_fn=attend, stats=s_ref)
    bat = _run(queries, k, v, begin, DCA, cfg, batched=True, attend_fn=attend, stats=s_bat)
    calls = _auto_on_cpu(monkeypatch)
    _fail_groups(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.75 GiB."), times=2)
    stats = {}
    choice = KernelChoice()
    with caplog.at_level(logging.DEBUG, logger=sparse_prefill.__name__):
        got = _run(queries, k, v, begin, DCA, cfg, batched=None, attend_fn=attend, stats=stats, kernels=choice)
        assert len(calls) == 1 and choice.sparse_batched and choice.oom_warned
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert stats == s_ref  # the failed attempt counted nothing
        again = _run(queries, k, v, begin, DCA, cfg, batched=None, attend_fn=attend, kernels=choice)  # per region
        assert len(calls) == 2 and torch.equal(again[0], ref[0])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and len([r for r in caplog.records if "ran out of device memory" in r.message]) == 2
    msg = warnings[0].getMessage()
    assert "Tried to allocate 2.75 GiB" in msg and f"130 queries over {total} keys, {H} heads ({KVH} kv heads)" in msg
    assert "GiB beside the KV cache" in msg
    third = _run(queries, k, v, begin, DCA, cfg, batched=None, attend_fn=attend, kernels=choice)  # batched again
    assert len(calls) == 3 and torch.equal(third[0], bat[0]) and torch.equal(third[1], bat[1])
    _fail_groups(monkeypatch, torch.OutOfMemoryError("CUDA out of memory."), times=1)
    with pytest.raises(torch.OutOfMemoryError):
        _run(queries, k, v, begin, DCA, cfg, batched=True, attend_fn=attend)


@needs_triton
def test_a_batched_kernel_that_cannot_be_built_turns_the_path_off_for_its_backend(monkeypatch, caplog):
    """A compile failure (here Triton's OutOfResources) turns the batched path off in the caller's
    KernelChoice only: that call and later ones take the per-region path; another choice tries again."""
    from triton.runtime.errors import OutOfResources

    begin, total = 21, 167
    queries, k, v = _inputs(total, begin, None)
    cfg = _cfg(4, 4)
    ref = _run(queries, k, v, begin, None, cfg, batched=False)
    calls = _auto_on_cpu(monkeypatch)
    _fail_groups(monkeypatch, OutOfResources(232448, 101376, "shared memory"), times=1)
    choice = KernelChoice()
    with caplog.at_level(logging.WARNING):
        got = _run(queries, k, v, begin, None, cfg, batched=None, kernels=choice)
        again = _run(queries, k, v, begin, None, cfg, batched=None, kernels=choice)
    assert len(calls) == 1 and not choice.sparse_batched
    assert "sparse_batched kernel cannot be built here (OutOfResources" in caplog.text
    assert torch.equal(got[0], ref[0]) and torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])
    _run(queries, k, v, begin, None, cfg, batched=None, kernels=KernelChoice())
    assert len(calls) == 2


@needs_triton
def test_a_bug_in_the_batched_path_is_raised_not_hidden(monkeypatch):
    """Any other error is a bug: it reaches the caller, and the batched path stays on."""
    begin, total = 21, 167
    queries, k, v = _inputs(total, begin, None)
    calls = _auto_on_cpu(monkeypatch)
    _fail_groups(monkeypatch, RuntimeError("an illegal memory access was encountered"), times=1)
    choice = KernelChoice()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run(queries, k, v, begin, None, _cfg(4, 4), batched=None, kernels=choice)
    assert len(calls) == 1 and choice.sparse_batched
