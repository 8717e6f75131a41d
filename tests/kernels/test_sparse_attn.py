"""vertical_slash_attention (Triton) vs sparse_attend_reference in float64.

CPU: TRITON_INTERPRET=1 (tests/kernels/conftest.py) at small sizes: odd lengths, num_q < num_kv and
num_q > num_kv (causal rows without keys), GQA 4 / 2, strided K/V, empty vertical and/or slash sets,
and "budgets covering every key == dense attend". GPU (-m gpu): Qwen2.5-7B shapes at real sizes.
Error bound (design §4.8): the kernel's max error vs float64 is at most 2x the error of the same
masked maths done by torch at the working precision (scores, probabilities and output rounded to it).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from qwen1m.attention.reference import attend
from qwen1m.attention.vertical_slash import (
    build_vertical_slash_index,
    sparse_attend_reference,
    vertical_slash_mask,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def torch_sparse_lowp(q, k, v, mask, *, softmax_scale):
    """Masked attention in torch at q's precision: scores, probabilities and output rounded to q.dtype."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # tests only: tiny K/V
    scores = torch.einsum("qhd,khd->hqk", q, kr).float() * softmax_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None]).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", probs, vr), lse


def make_inputs(num_q, num_kv, num_heads, num_kv_heads, head_dim, dtype, strided, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(num_q, num_heads, head_dim, generator=g, device=device).to(dtype)
    if strided:  # K/V as views of a wider cache: every other token, heads interleaved with V's
        kv = torch.randn(2 * num_kv, num_kv_heads, 2, head_dim, generator=g, device=device).to(dtype)
        return q, kv[::2, :, 0], kv[::2, :, 1]
    k = torch.randn(num_kv, num_kv_heads, head_dim, generator=g, device=device).to(dtype)
    return q, k, torch.randn(num_kv, num_kv_heads, head_dim, generator=g, device=device).to(dtype)


def make_index(num_heads, nv, ns, num_q, num_kv, *, causal, block_m, block_n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    v_idx = torch.randint(0, max(1, num_kv), (num_heads, nv), generator=g)
    s_idx = torch.randint(0 if causal else -num_q, max(1, num_kv), (num_heads, ns), generator=g)
    if ns:
        s_idx[:, 0] = 0  # the main diagonal: every causal row reads at least its own key
    return build_vertical_slash_index(v_idx.to(device), s_idx.to(device), num_q, num_kv, causal=causal,
                                      block_m=block_m, block_n=block_n)


def run_kernel(q, k, v, index, *, softmax_scale, causal):
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), device=q.device)
    out, lse = vertical_slash_attention(q, k, v, index, softmax_scale=softmax_scale, causal=causal, out=out, lse=lse)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (NaN-poisoned) elements"
    return out, lse


def check(out, lse, q, k, v, ref_out, ref_lse, mask, *, softmax_scale):
    empty = torch.isinf(ref_lse)  # [num_heads, num_q]: rows that read no key
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert (out.permute(1, 0, 2)[empty] == 0).all()
    if (~empty).sum() == 0:
        return
    base_out, base_lse = torch_sparse_lowp(q, k, v, mask, softmax_scale=softmax_scale)
    rows = ~empty.transpose(0, 1)
    err = (out.double() - ref_out)[rows].abs().max().item()
    base_err = (base_out.double() - ref_out)[rows].abs().max().item()
    assert err <= 2 * base_err + ATOL[q.dtype], f"out error {err:.3g} vs torch {q.dtype} error {base_err:.3g}"
    lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
    base_lse_err = (base_lse.double() - ref_lse)[~empty].abs().max().item()
    assert lse_err <= 2 * base_lse_err + 1e-5, f"lse error {lse_err:.3g} vs torch {base_lse_err:.3g}"


def check_against_reference(out, lse, q, k, v, index, *, softmax_scale, causal):
    ref_out, ref_lse = sparse_attend_reference(q.double(), k.double(), v.double(), index,
                                               softmax_scale=softmax_scale, causal=causal)
    mask = vertical_slash_mask(index, q.shape[0], k.shape[0], causal)
    check(out, lse, q, k, v, ref_out, ref_lse, mask, softmax_scale=softmax_scale)


# (num_q, num_kv, nv, ns, block_m, block_n, strided): length 1, odd lengths, num_q < num_kv,
# num_q > num_kv (causal rows without keys), query blocks larger and smaller than key blocks,
# empty vertical and/or slash sets.
CASES = [
    (1, 1, 1, 1, 16, 16, False),
    (1, 45, 3, 2, 16, 16, True),
    (37, 37, 5, 6, 16, 16, False),
    (37, 83, 7, 9, 32, 16, True),
    (21, 70, 6, 4, 16, 32, False),
    (40, 17, 4, 5, 16, 16, True),
    (37, 83, 0, 9, 16, 16, False),
    (37, 83, 9, 0, 16, 16, True),
    (19, 30, 0, 0, 16, 16, False),
]


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_q,num_kv,nv,ns,block_m,block_n,strided", CASES)
def test_kernel_matches_reference(num_q, num_kv, nv, ns, block_m, block_n, strided, causal, dtype):
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    q, k, v = make_inputs(num_q, num_kv, num_heads, num_kv_heads, head_dim, dtype, strided, seed=num_q + nv)
    index = make_index(num_heads, nv, ns, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n,
                       seed=num_kv + ns)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = run_kernel(q, k, v, index, softmax_scale=scale, causal=causal)
    check_against_reference(out, lse, q, k, v, index, softmax_scale=scale, causal=causal)


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_launch_config_does_not_change_the_result(causal):
    """config overrides (head-major grid, warps) launch the same programs in another order: the same
    bits, and the reference's result (5 query blocks x 4 heads)."""
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    q, k, v = make_inputs(75, 90, 4, 2, 32, torch.float32, True, seed=3)
    index = make_index(4, 5, 7, 75, 90, causal=causal, block_m=16, block_n=16, seed=4)
    out, lse = run_kernel(q, k, v, index, softmax_scale=0.2, causal=causal)
    check_against_reference(out, lse, q, k, v, index, softmax_scale=0.2, causal=causal)
    for config in ({"heads_first": True}, {"heads_first": True, "num_warps": 8}, {"num_warps": 2}):
        out2, lse2 = vertical_slash_attention(q, k, v, index, softmax_scale=0.2, causal=causal, config=config)
        assert torch.equal(out2, out) and torch.equal(lse2, lse), config


@cpu_only
@pytest.mark.parametrize("dtype,num_kv_heads", [(torch.float32, 2), (torch.bfloat16, 2), (torch.float16, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_equals_dense(causal, dtype, num_kv_heads):
    """Every diagonal as a slash (plus every column): the sparse kernel is dense ``attend``."""
    num_q, num_kv, num_heads = 29, 53, 4
    q, k, v = make_inputs(num_q, num_kv, num_heads, num_kv_heads, 16, dtype, strided=True, seed=7)
    s_idx = torch.arange(1 - num_q, num_kv).expand(num_heads, -1)
    v_idx = torch.arange(num_kv).expand(num_heads, -1)
    index = build_vertical_slash_index(v_idx, s_idx, num_q, num_kv, causal=causal, block_m=16, block_n=16)
    out, lse = run_kernel(q, k, v, index, softmax_scale=0.25, causal=causal)
    ref_out, ref_lse = attend(q.double(), k.double(), v.double(), softmax_scale=0.25, causal=causal)
    mask = torch.ones(num_heads, num_q, num_kv, dtype=torch.bool)
    if causal:
        mask &= torch.arange(num_kv)[None, :] <= torch.arange(num_q)[:, None] + num_kv - num_q
    check(out, lse, q, k, v, ref_out, ref_lse, mask, softmax_scale=0.25)


@cpu_only
def test_columns_only_equals_dense():
    """Verticals alone covering every key (no dense blocks): the column path is dense ``attend`` too."""
    num_q, num_kv = 20, 40
    q, k, v = make_inputs(num_q, num_kv, 4, 2, 16, torch.float32, strided=False, seed=9)
    v_idx = torch.arange(num_kv).flip(0).expand(4, -1)
    index = build_vertical_slash_index(v_idx, torch.empty(4, 0, dtype=torch.long), num_q, num_kv,
                                       causal=True, block_m=16, block_n=16)
    assert (index.block_count == 0).all()
    out, lse = run_kernel(q, k, v, index, softmax_scale=0.25, causal=True)
    ref_out, ref_lse = attend(q.double(), k.double(), v.double(), softmax_scale=0.25, causal=True)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def tile_kinds(index, num_q: int, num_kv: int, causal: bool) -> dict[str, int]:
    """Listed tiles by kind, counted in Python the way the kernel splits them: dense blocks and whole
    groups of block_n columns that every row of their query block sees in full ("clear") or not."""
    bm, bn = index.block_m, index.block_n
    kinds = dict.fromkeys(("clear_blocks", "masked_blocks", "clear_columns", "masked_columns"), 0)
    for h in range(index.num_heads):
        for b in range(-(-num_q // bm)):
            end = min(num_kv, b * bm + num_kv - num_q + 1) if causal else num_kv
            offsets = index.block_offset[h, b, : index.block_count[h, b]].tolist()
            cols = index.column_index[h, b, : index.column_count[h, b]].tolist()
            n_clear = sum(o + bn <= end for o in offsets)
            clear_groups = sum(c < end for c in cols) // bn
            kinds["clear_blocks"] += n_clear
            kinds["masked_blocks"] += len(offsets) - n_clear
            kinds["clear_columns"] += clear_groups
            kinds["masked_columns"] += -(-len(cols) // bn) - clear_groups
    return kinds


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_clear_tiles_run_unmasked_with_the_same_result(causal):
    """Tiles every row sees run without masks; masking every tile (split_masks=False, the kernel
    before the split) gives the same bits, and both are the reference. The case has clear and
    masked tiles of both sorts (blocks and column groups), so every path runs."""
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    num_q, num_kv = 37, 300
    q, k, v = make_inputs(num_q, num_kv, 4, 2, 32, torch.float32, True, seed=11)
    index = make_index(4, 100, 4, num_q, num_kv, causal=causal, block_m=16, block_n=16, seed=12)
    kinds = tile_kinds(index, num_q, num_kv, causal)
    assert all(kinds.values()), kinds
    out, lse = run_kernel(q, k, v, index, softmax_scale=0.2, causal=causal)
    check_against_reference(out, lse, q, k, v, index, softmax_scale=0.2, causal=causal)
    out2, lse2 = vertical_slash_attention(q, k, v, index, softmax_scale=0.2, causal=causal,
                                          config={"split_masks": False})
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@cpu_only
def test_rejects_mismatched_index():
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    q, k, v = make_inputs(8, 8, 2, 1, 16, torch.float32, strided=False)
    index = make_index(2, 2, 2, 8, 8, causal=True, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="causal"):
        vertical_slash_attention(q, k, v, index, softmax_scale=0.1, causal=False)
    small = make_index(2, 2, 2, 8, 8, causal=True, block_m=8, block_n=8)
    with pytest.raises(ValueError, match="block_m"):
        vertical_slash_attention(q, k, v, small, softmax_scale=0.1, causal=True)


# GPU: a chunk of queries at the end of the keys (chunked prefill), in Qwen2.5-7B-1M's head shape
# and in the bundled model's (4 heads, 2 KV heads, head_dim 64: the eval's dca+sparse mode)
GPU_CASES = [(4096, 4096, True), (2048, 16384, True), (3000, 12289, False), (1000, 5000, True)]
HEAD_SHAPES = [(28, 4, 128), (4, 2, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("num_q,num_kv,causal", GPU_CASES)
def test_kernel_gpu(num_q, num_kv, causal, num_heads, num_kv_heads, head_dim):
    q, k, v = make_inputs(num_q, num_kv, num_heads, num_kv_heads, head_dim, torch.bfloat16, strided=True,
                          device="cuda")
    index = make_index(num_heads, 300, 500, num_q, num_kv, causal=causal, block_m=64, block_n=64,
                       device="cuda")
    scale = head_dim**-0.5
    out, lse = run_kernel(q, k, v, index, softmax_scale=scale, causal=causal)
    # the reference on a few query blocks only: a float64 [28, num_q, num_kv] mask would not fit
    for start in sorted({0, (num_q // 2) // 64 * 64, (num_q - 1) // 64 * 64}):
        end = min(start + 64, num_q)
        b = start // 64
        lim = end + num_kv - num_q if causal else num_kv
        sub = dataclasses.replace(
            index, num_q=end - start, num_kv=lim,
            block_count=index.block_count[:, b : b + 1], block_offset=index.block_offset[:, b : b + 1],
            column_count=index.column_count[:, b : b + 1], column_index=index.column_index[:, b : b + 1])
        # rows [start, end) of the full problem == a problem of end - start queries whose keys end at
        # end + num_kv - num_q (causal alignment), with the block's index
        check_against_reference(out[start:end], lse[:, start:end], q[start:end], k[:lim], v[:lim], sub,
                                softmax_scale=scale, causal=causal)
