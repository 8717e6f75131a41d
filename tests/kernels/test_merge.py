"""merge_attn_states (Triton) vs reference.merge_attn_states, and the equivalence that motivates it:
attention over disjoint key ranges, merged, equals attention over all keys (float64 reference)."""

from __future__ import annotations

import os

import pytest
import torch

from qwen1m.attention import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")


def random_parts(num_parts, num_q, num_heads, head_dim, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for p in range(num_parts):
        out = torch.randn(num_q, num_heads, head_dim, generator=g, device=device).to(dtype)
        lse = torch.randn(num_heads, num_q, generator=g, device=device) * 4
        # empty parts: one head empty in every part but the last, one (head, row) empty everywhere
        if p < num_parts - 1:
            lse[0] = float("-inf")
            out[:, 0] = 0
        if num_q > 2:
            lse[-1, 2] = float("-inf")
            out[2, -1] = 0
        parts.append((out, lse))
    return parts


def merge_float64(parts):
    """The reference formula in float64 (reference.merge_attn_states accumulates in float32)."""
    lses = torch.stack([lse.double() for _, lse in parts])  # [P, num_heads, num_q]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.nan_to_num(neginf=0.0)[None])
    out = sum(o.double() * w.transpose(0, 1)[..., None] for (o, _), w in zip(parts, weights, strict=True))
    return out, total


def check_merge(parts, out, lse):
    ref_out, ref_lse = merge_float64(parts)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse.double() - ref_lse)[fin].abs().max() <= 1e-5
    # torch at the working precision: the reference merge (float32 maths, one rounding to out dtype)
    base_out, _ = reference.merge_attn_states(parts)
    err = (out.double() - ref_out).abs().max().item()
    base_err = (base_out.double() - ref_out).abs().max().item()
    eps = torch.finfo(out.dtype).eps
    assert err <= 2 * base_err + eps, f"merge error {err:.3g} vs torch {base_err:.3g}"


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_parts,num_q,num_heads,head_dim", [(2, 1, 2, 16), (3, 17, 5, 32), (4, 67, 4, 64)]
)
def test_merge_matches_reference(num_parts, num_q, num_heads, head_dim, dtype):
    from qwen1m.kernels.merge import merge_attn_states

    parts = random_parts(num_parts, num_q, num_heads, head_dim, dtype)
    out, lse = merge_attn_states(parts)
    assert out.dtype == dtype and lse.dtype == torch.float32
    check_merge(parts, out, lse)


@cpu_only
def test_merge_strided_inputs():
    from qwen1m.kernels.merge import merge_attn_states

    parts = random_parts(2, 9, 4, 32, torch.float32, seed=3)
    # same values, other memory layouts: out head-major, lse token-major
    strided = [(o.transpose(0, 1).contiguous().transpose(0, 1), lse.t().contiguous().t()) for o, lse in parts]
    out, lse = merge_attn_states(strided)
    check_merge(parts, out, lse)


@cpu_only
def test_merged_split_attention_equals_full():
    from qwen1m.kernels.flash_attn import flash_attn
    from qwen1m.kernels.merge import merge_attn_states

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(n, h, 32, generator=g) for n, h in ((19, 4), (50, 2), (50, 2)))
    ranges = ((0, 7), (7, 31), (31, 50))
    parts = [flash_attn(q, k[a:b], v[a:b], softmax_scale=0.2, causal=False) for a, b in ranges]
    out, lse = merge_attn_states(parts)
    ref_out, ref_lse = reference.attend(q.double(), k.double(), v.double(), softmax_scale=0.2, causal=False)
    assert (out.double() - ref_out).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5


@pytest.mark.gpu
def test_merge_gpu():
    from qwen1m.kernels.merge import merge_attn_states

    parts = random_parts(3, 16384, 28, 128, torch.bfloat16, device="cuda")
    out, lse = merge_attn_states(parts)
    check_merge(parts, out, lse)
