"""flash_attn (Triton) vs reference.attend in float64.

CPU: TRITON_INTERPRET=1 (tests/kernels/conftest.py) at small sizes over awkward shapes.
GPU (-m gpu): real sizes, head_dim 128, 28 q heads / 4 kv heads, bf16, and the ops dispatcher.
Error bound (design §4.8): the kernel's max error vs float64 is at most 2x the error of the same
maths done by torch at the working precision (scores, probabilities and output rounded to it).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from qwen1m.attention.reference import attend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def torch_attend_lowp(q, k, v, *, softmax_scale: float, causal: bool):
    """The same maths in torch at q's precision: scores, probabilities and output rounded to q.dtype."""
    num_q, num_heads, head_dim = q.shape
    num_kv, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # tests only: tiny K/V
    scores = torch.einsum("qhd,khd->hqk", q, kr).float() * softmax_scale
    if causal:
        visible = torch.arange(num_kv, device=q.device)[None, :] <= (
            torch.arange(num_q, device=q.device)[:, None] + num_kv - num_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None]).to(q.dtype)
    out = torch.einsum("hqk,khd->qhd", probs, vr)
    return out, lse


def make_inputs(num_q, num_kv, num_heads, num_kv_heads, head_dim, dtype, strided, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(num_q, num_heads, head_dim, generator=g, device=device).to(dtype)
    if strided:  # K/V as views of a wider cache: every other token, heads interleaved with V's
        kv = torch.randn(2 * num_kv, num_kv_heads, 2, head_dim, generator=g, device=device).to(dtype)
        k, v = kv[::2, :, 0], kv[::2, :, 1]
    else:
        k = torch.randn(num_kv, num_kv_heads, head_dim, generator=g, device=device).to(dtype)
        v = torch.randn(num_kv, num_kv_heads, head_dim, generator=g, device=device).to(dtype)
    return q, k, v


def check_against_reference(out, lse, q, k, v, *, softmax_scale, causal):
    ref_out, ref_lse = attend(q.double(), k.double(), v.double(), softmax_scale=softmax_scale, causal=causal)
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (NaN-poisoned) elements"
    empty = torch.isinf(ref_lse)  # [num_heads, num_q]: rows that see no key
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert (out.permute(1, 0, 2)[empty] == 0).all()
    if (~empty).sum() == 0:
        return
    base_out, base_lse = torch_attend_lowp(q, k, v, softmax_scale=softmax_scale, causal=causal)
    rows = ~empty.transpose(0, 1)  # [num_q, num_heads]
    err = (out.double() - ref_out)[rows].abs().max().item()
    base_err = (base_out.double() - ref_out)[rows].abs().max().item()
    atol = ATOL[q.dtype]
    assert err <= 2 * base_err + atol, f"out error {err:.3g} vs torch {q.dtype} error {base_err:.3g}"
    lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
    base_lse_err = (base_lse.double() - ref_lse)[~empty].abs().max().item()
    assert lse_err <= 2 * base_lse_err + 1e-5, f"lse error {lse_err:.3g} vs torch {base_lse_err:.3g}"


# (num_q, num_kv, num_heads, num_kv_heads, strided): lengths 1, not multiples of the 16-wide
# interpreter blocks, num_q < num_kv (bottom-right causal), num_q == num_kv, num_q > num_kv (empty
# causal rows), num_kv == 0; GQA (4 / 2) and MHA; contiguous and strided K/V.
CASES = [
    (1, 1, 4, 2, False),
    (1, 130, 4, 2, True),
    (17, 0, 4, 2, False),
    (17, 1, 4, 4, True),
    (17, 33, 4, 2, True),
    (17, 17, 4, 4, False),
    (67, 130, 4, 2, False),
    (67, 67, 4, 2, True),
    (67, 33, 4, 4, False),
]


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_q,num_kv,num_heads,num_kv_heads,strided", CASES)
def test_flash_attn_matches_reference(num_q, num_kv, num_heads, num_kv_heads, strided, causal, dtype):
    from qwen1m.kernels.flash_attn import flash_attn

    head_dim = 32
    q, k, v = make_inputs(num_q, num_kv, num_heads, num_kv_heads, head_dim, dtype, strided)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((num_heads, num_q), float("nan"))
    out, lse = flash_attn(q, k, v, softmax_scale=scale, causal=causal, out=out, lse=lse)
    assert out.dtype == dtype and lse.dtype == torch.float32
    check_against_reference(out, lse, q, k, v, softmax_scale=scale, causal=causal)


@cpu_only
@pytest.mark.parametrize("head_dim", [16, 64])
def test_flash_attn_head_dims(head_dim):
    from qwen1m.kernels.flash_attn import flash_attn

    q, k, v = make_inputs(20, 40, 4, 2, head_dim, torch.float32, strided=False, seed=head_dim)
    out, lse = flash_attn(q, k, v, softmax_scale=0.3, causal=True)
    check_against_reference(out, lse, q, k, v, softmax_scale=0.3, causal=True)


@cpu_only
def test_flash_attn_rejects_bad_head_dim():
    from qwen1m.kernels.flash_attn import flash_attn

    q, k, v = make_inputs(4, 4, 2, 2, 48, torch.float32, strided=False)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn(q, k, v, softmax_scale=0.1, causal=True)


def test_get_attend_fn_cpu_never_needs_triton():
    from qwen1m.attention.ops import _cpu_attend, get_attend_fn, get_merge_fn
    from qwen1m.attention.reference import merge_attn_states

    assert get_attend_fn(torch.device("cpu")) is _cpu_attend  # torch's CPU flash kernel, else the reference
    assert get_merge_fn(torch.device("cpu")) is merge_attn_states


def _gpu_window_check(out, lse, q, k, v, *, softmax_scale, causal, rows=32):
    """check_against_reference on windows of query rows (a float64 N x N reference is too large)."""
    num_q, num_kv = q.shape[0], k.shape[0]
    for start in (0, num_q // 2, num_q - rows):
        end = min(start + rows, num_q)
        lim = end + num_kv - num_q if causal else num_kv  # keys the window's rows can see
        sl = slice(start, end)
        check_against_reference(out[sl], lse[:, sl], q[sl], k[:lim], v[:lim], softmax_scale=softmax_scale,
                                causal=causal)


GPU_CASES = [(4096, 4096, True), (16384, 16384, True), (1024, 16384, True), (3000, 12289, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_q,num_kv,causal", GPU_CASES)
def test_flash_attn_gpu(num_q, num_kv, causal):
    from qwen1m.kernels.flash_attn import flash_attn

    q, k, v = make_inputs(num_q, num_kv, 28, 4, 128, torch.bfloat16, strided=True, device="cuda")
    out = torch.full_like(q, float("nan"))
    lse = torch.full((28, num_q), float("nan"), device="cuda")
    out, lse = flash_attn(q, k, v, softmax_scale=128**-0.5, causal=causal, out=out, lse=lse)
    _gpu_window_check(out, lse, q, k, v, softmax_scale=128**-0.5, causal=causal)
    assert not out.isnan().any() and not lse.isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_q,num_kv,causal", GPU_CASES + [(1, 8192, False), (1, 8192, True), (64, 8192, False), (8, 8, True)]
)
def test_get_attend_fn_gpu(num_q, num_kv, causal):
    from qwen1m.attention.ops import get_attend_fn

    fn = get_attend_fn(torch.device("cuda"))
    q, k, v = make_inputs(num_q, num_kv, 28, 4, 128, torch.bfloat16, strided=True, device="cuda", seed=1)
    out, lse = fn(q, k, v, softmax_scale=128**-0.5, causal=causal)
    assert out.shape == q.shape and lse.shape == (28, num_q) and lse.dtype == torch.float32
    _gpu_window_check(out, lse, q, k, v, softmax_scale=128**-0.5, causal=causal, rows=min(32, num_q))


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_problems_kernel_attends_the_dense_problems_and_leaves_the_others(dtype):
    """flash_attn_problems (the sparse step's dense regions): each problem marked dense writes its rows
    of its output slot as flash_attn over its key range would (causal bottom-right or not, query rows
    past the keys, a range with no keys); rows of problems not marked dense stay as they were."""
    from qwen1m.kernels.flash_attn_problems import _PROB_FIELDS, flash_attn_problems
    from qwen1m.kernels.sparse_attn import PROB_FIELDS

    assert _PROB_FIELDS == PROB_FIELDS  # both kernels read one table

    num_tokens, num_heads, num_kv_heads, head_dim, total_keys = 45, 4, 2, 32, 130
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, num_tokens, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(total_keys, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(total_keys, num_kv_heads, head_dim, generator=g).to(dtype)
    # (q slot, first row, first key, num_q, num_kv, causal, dense, out slot)
    table = [
        (0, 0, 0, 20, 70, 1, 1, 0),  # causal, keys past the queries
        (1, 0, 70, 20, 33, 0, 1, 1),  # non-causal, another q slot and key range
        (0, 20, 100, 25, 9, 1, 1, 0),  # causal with more queries than keys: early rows see nothing
        (1, 20, 0, 25, 0, 0, 1, 1),  # no keys at all
        (0, 0, 5, 45, 50, 1, 0, 2),  # not dense: untouched
    ]
    out = torch.full((3, num_tokens, num_heads, head_dim), float("nan"), dtype=dtype)
    lse = torch.full((3, num_heads, num_tokens), float("nan"))
    flash_attn_problems(q, k, v, torch.tensor(table, dtype=torch.int32), out, lse, softmax_scale=0.2,
                        max_num_q=max(row[3] for row in table), config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4,
                                                                            num_stages=1))
    for q_slot, row0, key0, num_q, num_kv, causal, dense, out_slot in table:
        rows = slice(row0, row0 + num_q)
        if not dense:
            assert out[out_slot, rows].isnan().all() and lse[out_slot, :, rows].isnan().all()
            continue
        got_out, got_lse = out[out_slot, rows], lse[out_slot, :, rows]
        if num_kv == 0:
            assert (got_out == 0).all() and torch.isneginf(got_lse).all()
            continue
        check_against_reference(got_out, got_lse, q[q_slot, rows], k[key0:key0 + num_kv], v[key0:key0 + num_kv],
                                softmax_scale=0.2, causal=bool(causal))
    with pytest.raises(ValueError, match="int32"):
        flash_attn_problems(q, k, v, torch.tensor(table)[:, :7], out, lse, softmax_scale=0.2, max_num_q=45)
