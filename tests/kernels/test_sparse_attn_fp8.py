"""The sparse vertical-slash kernel and the dense-problem kernel with FP8 (e4m3) inputs, against
float64 oracles on the dequantised inputs, with test_flash_attn_fp8's e4m3 bound (stated there):

    |out - ref| <= 2^-4 * sum_j p_j |v_j| / l + n_kv * 2^-18 * max|v|   per row, mean error < half of it.

The sparse kernel's oracle is ``sparse_attend_reference`` (masked dense attention over the index's
mask); the problem kernel's is ``attend`` on each problem's query rows and key range. Both kernels
gather keys by index (columns, block offsets, key ranges), so the cases cover the FP8 paths the dense
kernel's tests do not: gathered K / V scales, padded column slots (scale 0), tiles that hold no key
of some rows, and the batched tables' slots. CPU: TRITON_INTERPRET=1 at small sizes; GPU (-m gpu):
7B shapes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_flash_attn_fp8 import check_fp8, make_fp8
from test_sparse_attn import make_index

from qwen1m.attention.fp8 import Fp8Tensor, quantize
from qwen1m.attention.vertical_slash import sparse_attend_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")

# (num_q, num_kv, nv, ns, block_m, block_n): one key, odd lengths, num_q < num_kv, num_q > num_kv
# (causal rows without keys), query blocks larger and smaller than key blocks, columns or slashes only
CASES = [
    (1, 1, 1, 1, 16, 16),
    (37, 37, 5, 6, 16, 16),
    (37, 83, 7, 9, 32, 16),
    (21, 70, 6, 4, 16, 32),
    (40, 17, 4, 5, 16, 16),
    (37, 83, 0, 9, 16, 16),
    (37, 83, 9, 0, 16, 16),
]


def run_sparse_fp8(q: Fp8Tensor, k: Fp8Tensor, v: Fp8Tensor, index, *, softmax_scale, causal, config=None):
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    num_q, num_heads, head_dim = q.shape
    out = torch.full((num_q, num_heads, head_dim), float("nan"))  # poisoned: every element must be written
    lse = torch.full((num_heads, num_q), float("nan"))
    return vertical_slash_attention(q.values, k.values, v.values, index, softmax_scale=softmax_scale, causal=causal,
                                    out=out, lse=lse, config=config, scales=(q.scale, k.scale, v.scale))


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_q,num_kv,nv,ns,block_m,block_n", CASES)
def test_sparse_fp8_kernel_within_the_e4m3_bound(num_q, num_kv, nv, ns, block_m, block_n, causal):
    q, k, v = make_fp8(num_q, num_kv, 4, 2, 32, seed=num_q * 7 + nv)
    index = make_index(4, nv, ns, num_q, num_kv, causal=causal, block_m=block_m, block_n=block_n, seed=num_kv + ns)
    scale = 1 / math.sqrt(32)
    out, lse = run_sparse_fp8(q, k, v, index, softmax_scale=scale, causal=causal)

    def reference(qd, kd, vd, *, softmax_scale, causal):
        return sparse_attend_reference(qd, kd, vd, index, softmax_scale=softmax_scale, causal=causal)

    check_fp8(out, lse, q, k, v, softmax_scale=scale, causal=causal, reference=reference)


@cpu_only
def test_sparse_fp8_unmasked_and_masked_tiles_agree():
    """split_masks=False masks every tile (the clear tiles then go through the masked FP8 path):
    the same result within float rounding, both within the bound."""
    q, k, v = make_fp8(64, 96, 4, 2, 32, seed=9)
    index = make_index(4, 6, 8, 64, 96, causal=True, block_m=16, block_n=16, seed=3)
    split, split_lse = run_sparse_fp8(q, k, v, index, softmax_scale=0.2, causal=True)
    masked, masked_lse = run_sparse_fp8(q, k, v, index, softmax_scale=0.2, causal=True,
                                        config={"split_masks": False})
    torch.testing.assert_close(split, masked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split_lse, masked_lse, rtol=1e-6, atol=1e-6)


def problem_case(seed=0):
    """Two query slots over one K / V, four problems of a DCA-like step: causal with a prefix, square
    causal, non-causal, and one with no keys (num_kv = 0)."""
    num_tokens, total_keys, heads, kv_heads, d = 40, 90, 4, 2, 32
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, num_tokens, heads, d, generator=g) * 1.5
    q8 = quantize(q.reshape(-1, heads, d))
    q8 = Fp8Tensor(q8.values.view(2, num_tokens, heads, d), q8.scale.view(2, num_tokens, heads))
    _, k8, v8 = make_fp8(1, total_keys, heads, kv_heads, d, seed=seed + 1)
    # (q slot, row0, key begin, num_q, num_kv, causal, dense, out slot)
    problems = torch.tensor([[0, 0, 0, 25, 50, 1, 1, 0],
                             [1, 25, 60, 15, 15, 1, 1, 1],
                             [0, 25, 10, 15, 33, 0, 1, 0],
                             [1, 0, 5, 25, 0, 0, 1, 1]], dtype=torch.int32)
    return q8, k8, v8, problems


@cpu_only
def test_dense_problems_fp8_within_the_e4m3_bound():
    from qwen1m.kernels.flash_attn_problems import flash_attn_problems

    q8, k8, v8, problems = problem_case()
    slots, num_tokens, heads, d = q8.shape
    out = torch.full((slots, num_tokens, heads, d), float("nan"))
    lse = torch.full((slots, heads, num_tokens), float("nan"))
    flash_attn_problems(q8.values, k8.values, v8.values, problems, out, lse, softmax_scale=0.2, max_num_q=25,
                        scales=(q8.scale, k8.scale, v8.scale))
    for q_slot, row0, key0, num_q, num_kv, causal, _, out_slot in problems.tolist():
        rows = slice(row0, row0 + num_q)
        got_out, got_lse = out[out_slot, rows], lse[out_slot, :, rows]
        if num_kv == 0:
            assert (got_out == 0).all() and torch.isinf(got_lse).all() and (got_lse < 0).all()
            continue
        check_fp8(got_out, got_lse, q8[q_slot][rows], k8[key0:key0 + num_kv], v8[key0:key0 + num_kv],
                  softmax_scale=0.2, causal=bool(causal))


@cpu_only
def test_dense_problems_fp8_equal_the_dense_fp8_kernel_per_problem():
    """Each problem of the table gives the single-call FP8 kernel's bits on its rows and key range."""
    from qwen1m.kernels.flash_attn_fp8 import flash_attn_fp8
    from qwen1m.kernels.flash_attn_problems import flash_attn_problems

    q8, k8, v8, problems = problem_case(seed=2)
    slots, num_tokens, heads, d = q8.shape
    out = torch.zeros(slots, num_tokens, heads, d)
    lse = torch.zeros(slots, heads, num_tokens)
    flash_attn_problems(q8.values, k8.values, v8.values, problems, out, lse, softmax_scale=0.2, max_num_q=25,
                        scales=(q8.scale, k8.scale, v8.scale))
    for q_slot, row0, key0, num_q, num_kv, causal, _, out_slot in problems.tolist()[:3]:
        rows, keys = slice(row0, row0 + num_q), slice(key0, key0 + num_kv)
        qq, kk, vv = q8[q_slot][rows], k8[keys], v8[keys]
        one, one_lse = flash_attn_fp8(qq.values, kk.values, vv.values, qq.scale, kk.scale, vv.scale,
                                      softmax_scale=0.2, causal=bool(causal), out_dtype=torch.float32)
        assert torch.equal(out[out_slot, rows], one) and torch.equal(lse[out_slot, :, rows], one_lse)


def test_fp8_sparse_kernels_reject_bad_inputs_in_one_sentence():
    from qwen1m.kernels.flash_attn_problems import flash_attn_problems
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    q, k, v = make_fp8(20, 30, 4, 2, 32)
    index = make_index(4, 2, 2, 20, 30, causal=True, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="scales must be float32"):
        vertical_slash_attention(q.values, k.values, v.values, index, softmax_scale=1.0, causal=True,
                                 scales=(q.scale, k.scale[:3], v.scale))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        vertical_slash_attention(q.dequantize(), k.values, v.values, index, softmax_scale=1.0, causal=True,
                                 scales=(q.scale, k.scale, v.scale))
    q8, k8, v8, problems = problem_case()
    with pytest.raises(ValueError, match="scales must be float32"):
        flash_attn_problems(q8.values, k8.values, v8.values, problems, torch.zeros(2, 40, 4, 32),
                            torch.zeros(2, 4, 40), softmax_scale=0.2, max_num_q=25,
                            scales=(q8.scale[0], k8.scale, v8.scale))


@pytest.mark.gpu
@pytest.mark.parametrize("num_q,num_kv,causal", [(4096, 4096, True), (1000, 5000, True), (777, 3000, False)])
def test_sparse_fp8_kernel_gpu_7b_shapes(num_q, num_kv, causal):
    from qwen1m.kernels.sparse_attn import vertical_slash_attention

    q, k, v = make_fp8(num_q, num_kv, 28, 4, 128, device="cuda", seed=num_q)
    index = make_index(28, 200, 300, num_q, num_kv, causal=causal, block_m=64, block_n=64, device="cuda")
    out, lse = vertical_slash_attention(q.values, k.values, v.values, index, softmax_scale=1 / math.sqrt(128),
                                        causal=causal, scales=(q.scale, k.scale, v.scale))

    def reference(qd, kd, vd, *, softmax_scale, causal):
        return sparse_attend_reference(qd, kd, vd, index, softmax_scale=softmax_scale, causal=causal)

    check_fp8(out.float(), lse, q, k, v, softmax_scale=1 / math.sqrt(128), causal=causal, out_rel=2.0 ** -8,
              reference=reference)

