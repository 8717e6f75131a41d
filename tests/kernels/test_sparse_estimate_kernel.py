"""attention_sums_triton vs attention_sums (the PyTorch path, CPU) and a float64 dense oracle.

CPU: TRITON_INTERPRET=1 (tests/conftest.py) at small sizes with 16 x 16 tiles: GQA groups 1 and 3,
head_dim 16 and 32, L smaller and larger than a row tile, query_end not a multiple of the key tile,
the DCA key ranges ("inter_critical", "succ_critical", "intra") with different query copies,
L == query_end, several LSE splits per range, K a strided view longer than query_end, scores large
enough for exp_floor's flush, fp32 and bf16 inputs. GPU (-m gpu): Qwen2.5-7B shapes at 64K keys.
Error bound: both the kernel and the PyTorch path differ from float64 only by fp32 rounding (bf16
inputs are exact in fp32 and both multiply them exactly), so both must be within
1e-5 relative + 1e-6 absolute of the oracle, and of each other.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from qwen1m.attention import sparse_estimate
from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.attention.sparse_estimate import attention_sums

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")
RTOL, ATOL = 1e-5, 1e-6
DCA_KINDS = ("inter_critical", "succ_critical", "intra")


def make_inputs(num_heads, num_kv_heads, head_dim, last, query_end, bounds, dtype, *, extra_keys=0,
                strided=False, seed=0, device="cpu"):
    """Queries per kind, K [query_end + extra_keys, KVH, D] and ranges cut at ``bounds``."""
    g = torch.Generator().manual_seed(seed)
    cuts = [0, *bounds, query_end]
    ranges = [(DCA_KINDS[-len(cuts) + 1 + i], a, b) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    queries = {kind: torch.randn(last, num_heads, head_dim, generator=g).to(dtype).to(device)
               for kind, _, _ in ranges}
    n = query_end + extra_keys
    if strided:  # K as a view of a wider cache: every other token, heads interleaved with V's
        k = torch.randn(2 * n, num_kv_heads, 2, head_dim, generator=g).to(dtype).to(device)[::2, :, 0]
    else:
        k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    return queries, k, ranges


def dense_oracle(queries, k, ranges, query_end, scale):
    """float64 softmax over the whole [heads, L, query_end] score matrix; vertical and slash sums."""
    last, num_heads, _ = next(iter(queries.values())).shape
    group = num_heads // k.shape[1]
    scores = torch.full((num_heads, last, query_end), float("-inf"), dtype=torch.float64)
    for kind, a, b in ranges:
        kk = k[a:b].double().cpu().repeat_interleave(group, dim=1)
        scores[:, :, a:b] = torch.einsum("lhd,nhd->hln", queries[kind].double().cpu(), kk) * scale
    q_pos = torch.arange(query_end - last, query_end)
    dist = q_pos[:, None] - torch.arange(query_end)[None, :]
    probs = torch.softmax(scores.masked_fill((dist < 0)[None], float("-inf")), -1)
    slash = torch.zeros(num_heads, query_end, dtype=torch.float64)
    slash.scatter_add_(1, dist.clamp_min(0).reshape(1, -1).expand(num_heads, -1), probs.reshape(num_heads, -1))
    return probs.sum(1), slash


def assert_close(out, ref, what):
    err = (out.double().cpu() - ref.double().cpu()).abs()
    bound = ATOL + RTOL * ref.double().cpu().abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds the bound by {worst:.3g}"


CASES = {
    # name: (heads, kv heads, head_dim, L, query_end, range bounds, scale, LSE split_len, input kwargs)
    "mha_small_L": (2, 2, 16, 8, 37, [], 0.25, None, {}),
    "gqa3_dca_long_L": (6, 2, 32, 24, 101, [23, 60], 0.18, 32, {}),
    "L_equals_query_end": (4, 2, 16, 20, 20, [9], 0.25, 16, {}),
    "strided_longer_k_flush": (4, 1, 16, 17, 53, [16], 6.0, 16, dict(extra_keys=9, strided=True)),
}


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_pytorch_and_float64(case, dtype):
    from qwen1m.kernels.sparse_estimate import attention_sums_triton

    heads, kv_heads, head_dim, last, query_end, bounds, scale, split_len, kw = CASES[case]
    queries, k, ranges = make_inputs(heads, kv_heads, head_dim, last, query_end, bounds, dtype, **kw)
    vert, slash = attention_sums_triton(queries, k, ranges, query_end, softmax_scale=scale, split_len=split_len)
    assert vert.shape == slash.shape == (heads, query_end)
    assert vert.dtype == slash.dtype == torch.float32
    ref_v, ref_s = attention_sums(queries, k, ranges, query_end, softmax_scale=scale, key_block=13)
    dv, ds = dense_oracle(queries, k, ranges, query_end, scale)
    assert_close(ref_v, dv, "torch vertical vs float64")  # the bound holds for the oracle path too
    assert_close(ref_s, ds, "torch slash vs float64")
    assert_close(vert, dv, "kernel vertical vs float64")
    assert_close(slash, ds, "kernel slash vs float64")
    assert_close(vert, ref_v, "kernel vertical vs torch")
    assert_close(slash, ref_s, "kernel slash vs torch")
    assert torch.allclose(vert.sum(-1).double(), torch.full((heads,), float(last), dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(slash.sum(-1), vert.sum(-1), rtol=1e-5)


def _cannot_build() -> Exception:
    """What Triton raises when a compiled kernel asks for more shared memory than the GPU has."""
    from triton.runtime.errors import OutOfResources

    return OutOfResources(232448, 101376, "shared memory")


def _on_cuda(monkeypatch) -> None:
    """The dispatch as on CUDA (simulated): the kernels are tried while the choice has them."""
    monkeypatch.setattr(sparse_estimate, "_triton_supported", lambda q, k, r, kernels: kernels.sparse_sums)


def test_dispatch_falls_back_once_when_the_kernel_cannot_be_built(monkeypatch, caplog):
    """A kernel that cannot be built is logged, turned off in the caller's KernelChoice (a backend's),
    and the PyTorch sums returned; another choice (another backend) still tries the kernel."""
    import qwen1m.kernels.sparse_estimate as kernels

    queries, k, ranges = make_inputs(4, 2, 16, 8, 30, [11], torch.float32)
    expected = attention_sums(queries, k, ranges, 30, softmax_scale=0.3)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise _cannot_build()

    monkeypatch.setattr(kernels, "attention_sums_triton", broken)
    _on_cuda(monkeypatch)
    choice = KernelChoice()
    with caplog.at_level(logging.WARNING):
        got = attention_sums(queries, k, ranges, 30, softmax_scale=0.3, kernels=choice)
        again = attention_sums(queries, k, ranges, 30, softmax_scale=0.3, kernels=choice)
    assert len(calls) == 1 and not choice.sparse_sums
    assert "sparse_sums kernel cannot be built here (OutOfResources" in caplog.text
    for a, b in zip((*got, *again), (*expected, *expected)):
        assert torch.equal(a, b)
    attention_sums(queries, k, ranges, 30, softmax_scale=0.3, kernels=KernelChoice())
    assert len(calls) == 2


def test_dispatch_passes_a_kernel_bug_on(monkeypatch):
    """Any other error in a kernel is a bug: it reaches the caller and the kernel stays on (no silent
    43-49x slower path)."""
    import qwen1m.kernels.sparse_estimate as kernels

    queries, k, ranges = make_inputs(4, 2, 16, 8, 30, [11], torch.float32)

    def buggy(*args, **kwargs):
        raise IndexError("index 40 is out of bounds")

    monkeypatch.setattr(kernels, "attention_sums_triton", buggy)
    monkeypatch.setattr(sparse_estimate, "_estimate_batched_triton", buggy)
    _on_cuda(monkeypatch)
    choice = KernelChoice()
    with pytest.raises(IndexError):
        attention_sums(queries, k, ranges, 30, softmax_scale=0.3, kernels=choice)
    with pytest.raises(IndexError):
        sparse_estimate.estimate_vertical_slash_batched(
            [queries], k, [ranges], [30], softmax_scale=0.3, vertical_sizes=[4] * 4, slash_sizes=[4] * 4,
            sink_tokens=1, local_diagonals=1, kernels=choice)
    assert choice.sparse_sums


def test_dispatch_passes_out_of_memory_on(monkeypatch):
    """Running out of memory is not a kernel failure: it reaches the caller (the sparse prefill, which
    retries per region), and the kernels stay on (the PyTorch path would need more memory, not less)."""
    import qwen1m.kernels.sparse_estimate as kernels

    queries, k, ranges = make_inputs(4, 2, 16, 8, 30, [11], torch.float32)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(kernels, "attention_sums_triton", out_of_memory)
    _on_cuda(monkeypatch)
    choice = KernelChoice()
    with pytest.raises(torch.OutOfMemoryError):
        attention_sums(queries, k, ranges, 30, softmax_scale=0.3, kernels=choice)
    assert choice.sparse_sums
    monkeypatch.setattr(sparse_estimate, "_estimate_batched_triton", out_of_memory)  # the batched estimate too
    with pytest.raises(torch.OutOfMemoryError):
        sparse_estimate.estimate_vertical_slash_batched(
            [queries], k, [ranges], [30], softmax_scale=0.3, vertical_sizes=[4] * 4, slash_sizes=[4] * 4,
            sink_tokens=1, local_diagonals=1, kernels=choice)
    assert choice.sparse_sums


# Batched estimate: pieces of one step as ``sparse_batched`` makes them, (L, query_end, range bounds).
# DCA: a short first piece (3 rows: fewer than last_q, query_end 20 below the vertical budget 25) with
# only an intra range, one with intra + succ, one with intra + succ + inter. Without DCA: one piece
# (the whole step) or several intra-only pieces.
BATCHED_CASES = {
    "dca": [(3, 20, []), (8, 57, [30]), (8, 101, [40, 80])],
    "dca_two_splits_each": [(8, 64, [20]), (5, 90, [31, 70])],
    "no_dca_one_piece": [(8, 77, [])],
    "no_dca_pieces": [(8, 33, []), (6, 70, [])],
}
BUDGETS = dict(vertical_sizes=[3, 25, 0, 7], slash_sizes=[4, 2, 30, 0], sink_tokens=2, local_diagonals=3)


def make_pieces(specs, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """Per piece: its query copies, key ranges and query_end, over one K (of the longest piece)."""
    queries, ranges, ends = [], [], []
    for i, (last, query_end, bounds) in enumerate(specs):
        q, _, r = make_inputs(num_heads, num_kv_heads, head_dim, last, query_end, bounds, dtype, seed=seed + 1 + i)
        queries.append(q)
        ranges.append(r)
        ends.append(query_end)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(max(ends) + 5, num_kv_heads, head_dim, generator=g).to(dtype)
    return queries, k, ranges, ends


def per_piece(queries, k, ranges, ends, scale):
    from qwen1m.attention.sparse_estimate import estimate_vertical_slash, pad_stack

    picks = [estimate_vertical_slash(q, k, r, e, softmax_scale=scale, **BUDGETS)
             for q, r, e in zip(queries, ranges, ends)]
    return pad_stack([v for v, _ in picks]), pad_stack([s for _, s in picks])


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(BATCHED_CASES))
def test_batched_estimate_equals_per_piece(case, dtype, monkeypatch):
    """The batched Triton estimate (2 launches for all pieces) == the stacked per-piece estimates, exactly:
    the PyTorch path (CPU reference) and the per-piece Triton kernels."""
    from qwen1m.attention.sparse_estimate import _estimate_batched_triton
    from qwen1m.kernels.sparse_estimate import attention_sums_batched_triton

    queries, k, ranges, ends = make_pieces(BATCHED_CASES[case], 4, 2, 16, dtype)
    scale = 0.3
    v_got, s_got = _estimate_batched_triton(queries, k, ranges, ends, softmax_scale=scale, split_len=32, **BUDGETS)
    v_ref, s_ref = per_piece(queries, k, ranges, ends, scale)  # CPU: the PyTorch sums
    assert v_got.shape == v_ref.shape and s_got.shape == s_ref.shape
    assert torch.equal(v_got, v_ref) and torch.equal(s_got, s_ref)
    monkeypatch.setattr(sparse_estimate, "_triton_supported", lambda *a: True)  # per piece: the Triton sums
    v_tri, s_tri = per_piece(queries, k, ranges, ends, scale)
    assert torch.equal(v_got, v_tri) and torch.equal(s_got, s_tri)
    # the sums themselves: each piece's rows as attention_sums (zero past its query_end)
    vert, slash = attention_sums_batched_triton(queries, k, ranges, ends, softmax_scale=scale, split_len=32)
    assert vert.shape == slash.shape == (len(ends), 4, max(ends))
    for p, end in enumerate(ends):
        ref_v, ref_s = attention_sums(queries[p], k, ranges[p], end, softmax_scale=scale)
        assert_close(vert[p, :, :end], ref_v, f"piece {p} vertical")
        assert_close(slash[p, :, :end], ref_s, f"piece {p} slash")
        assert not vert[p, :, end:].any() and not slash[p, :, end:].any()


@cpu_only
def test_batched_estimate_short_piece_widths_and_padding():
    """A piece whose query_end (20) is below a head's budget (25): -1 past its query_end, as the
    per-piece top-k clamped to its width and padded by ``pad_stack``; a budget of 0 gives all -1."""
    from qwen1m.attention.sparse_estimate import _estimate_batched_triton

    queries, k, ranges, ends = make_pieces(BATCHED_CASES["dca"], 4, 2, 16, torch.float32, seed=3)
    v_idx, s_idx = _estimate_batched_triton(queries, k, ranges, ends, softmax_scale=0.3, **BUDGETS)
    assert v_idx.shape == (3, 4, 25) and s_idx.shape == (3, 4, 30)
    assert (v_idx[0, 1] >= 0).sum() == 20 and (v_idx[0, 1, 20:] == -1).all()  # clamped to query_end
    assert (v_idx[1, 1] >= 0).sum() == 25 and (v_idx[:, 2] == -1).all() and (s_idx[:, 3] == -1).all()
    assert (s_idx[0, 2] >= 0).sum() == 20 and (s_idx[2, 2] >= 0).sum() == 30
    assert (v_idx < torch.tensor(ends)[:, None, None]).all() and (s_idx < torch.tensor(ends)[:, None, None]).all()
    assert s_idx[0, 1, :2].tolist() == [0, 1]  # budget 2 < 3 local diagonals: the nearest, deterministically


@cpu_only
def test_batched_estimate_in_piece_groups_equals_per_piece():
    """Sums over a memory cap: pieces run in groups (here one each), the picks padded to one width."""
    from qwen1m.attention.sparse_estimate import _estimate_batched_triton, _piece_groups

    queries, k, ranges, ends = make_pieces(BATCHED_CASES["dca"], 4, 2, 16, torch.float32, seed=4)
    assert _piece_groups(ends, 4, 4 * 60) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert _piece_groups(ends, 4, 2 * 4 * 57) == [slice(0, 2), slice(2, 3)]
    assert _piece_groups(ends, 4) == [slice(0, 3)]
    got = _estimate_batched_triton(queries, k, ranges, ends, softmax_scale=0.3, max_elements=4 * 60, **BUDGETS)
    ref = per_piece(queries, k, ranges, ends, 0.3)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_batched_dispatch_falls_back_when_the_kernel_cannot_be_built(monkeypatch, caplog):
    """CUDA dispatch (simulated): a batched kernel that cannot be built is logged, turned off in the
    caller's choice, and the per-piece loop (the PyTorch path) answers."""
    import qwen1m.kernels.sparse_estimate as kernels
    from qwen1m.attention.sparse_estimate import estimate_vertical_slash_batched

    queries, k, ranges, ends = make_pieces(BATCHED_CASES["dca"], 4, 2, 16, torch.float32)
    expected = per_piece(queries, k, ranges, ends, 0.3)

    def broken(*args, **kwargs):
        raise _cannot_build()

    monkeypatch.setattr(kernels, "attention_sums_batched_triton", broken)
    _on_cuda(monkeypatch)
    choice = KernelChoice()
    with caplog.at_level(logging.WARNING):
        got = estimate_vertical_slash_batched(queries, k, ranges, ends, softmax_scale=0.3, kernels=choice,
                                              **BUDGETS)
    assert not choice.sparse_sums
    assert "sparse_sums kernel cannot be built here" in caplog.text
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_7b_shapes_match_pytorch(dtype, monkeypatch):
    """Qwen2.5-7B: 28 / 4 heads, head_dim 128, L 64, 65536 keys in three DCA ranges, vs the torch path."""
    from qwen1m.kernels.sparse_estimate import attention_sums_triton

    query_end = 65536
    queries, k, ranges = make_inputs(28, 4, 128, 64, query_end, [20000, 41000], dtype, device="cuda")
    scale = 128 ** -0.5
    vert, slash = attention_sums_triton(queries, k, ranges, query_end, softmax_scale=scale)
    ref_v, ref_s = attention_sums(queries, k, ranges, query_end, softmax_scale=scale,
                                  kernels=KernelChoice(sparse_sums=False))
    torch.cuda.synchronize()
    # both are fp32 maths over the same (exactly representable) inputs: summation order only
    assert torch.allclose(vert, ref_v, rtol=1e-4, atol=1e-6)
    assert torch.allclose(slash, ref_s, rtol=1e-4, atol=1e-6)
    assert torch.allclose(vert.sum(-1), torch.full((28,), 64.0, device="cuda"), rtol=1e-4)
    choice = KernelChoice()
    got_v, got_s = attention_sums(queries, k, ranges, query_end, softmax_scale=scale, kernels=choice)  # dispatch
    # the dispatch ran the kernel (the vertical sums have a fixed order: bit-equal); the slash sums are
    # atomic adds, whose order differs between runs (2026-11-29 on the H200: not bit-equal), so close
    assert choice.sparse_sums and torch.equal(got_v, vert)
    assert torch.allclose(got_s, slash, rtol=1e-5, atol=1e-7)
