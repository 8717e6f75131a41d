"""rms_norm (Triton, optional fused residual add) vs rms_norm_reference (transformers' Qwen2RMSNorm
maths). CPU: TRITON_INTERPRET=1 at small sizes; GPU: the same cases at Qwen2.5-7B's hidden size."""

from __future__ import annotations

import pytest
import torch

from qwen1m.kernels.rmsnorm import rms_norm, rms_norm_reference


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [7, 64, 200])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_reference(dtype, n, residual):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(5, n, generator=gen) * 3).to(dtype).to(_device())
    w = (1 + torch.randn(n, generator=gen) * 0.1).to(dtype).to(_device())
    r = torch.randn(5, n, generator=gen).to(dtype).to(_device()) if residual else None
    got, ref = rms_norm(x, w, 1e-6, r), rms_norm_reference(x, w, 1e-6, r)
    if residual:
        (got, got_h), (ref, ref_h) = got, ref
        torch.testing.assert_close(got_h, ref_h, atol=0, rtol=0)  # the residual sum is one rounding
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # float32 sums of squares in another order: one ulp of the activation dtype at most
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    if dtype != torch.float32:  # a last-bit float32 difference in 1/rms rarely survives the rounding
        assert (got == ref).float().mean() > 0.95


def test_rms_norm_strided_rows_and_leading_dims():
    # q of a fused qkv projection seen as [tokens, heads, head_dim]: Qwen3's per-head q_norm
    qkv = torch.randn(3, 4 * 16 + 2 * 2 * 16, device=_device())
    q = qkv[:, : 4 * 16].view(3, 4, 16)
    w = torch.rand(16, device=_device()) + 0.5
    torch.testing.assert_close(rms_norm(q, w, 1e-6), rms_norm_reference(q, w, 1e-6), atol=1e-6, rtol=1e-6)


def test_rms_norm_float32_weight_promotes():
    x = torch.randn(2, 32, device=_device()).to(torch.bfloat16)
    w = torch.rand(32, device=_device())
    got, ref = rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 32, 4096])
def test_rms_norm_gpu_qwen7b_hidden(rows):
    x = torch.randn(rows, 3584, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, 3584, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(3584, device="cuda")).to(torch.bfloat16)
    (got, h), (ref, ref_h) = rms_norm(x, w, 1e-6, r), rms_norm_reference(x, w, 1e-6, r)
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)
    torch.testing.assert_close(got, ref, atol=8e-3, rtol=8e-3)
    assert (got == ref).float().mean() > 0.99
