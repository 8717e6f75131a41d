"""flash_attn_fp8 (Triton, e4m3 inputs) vs reference.attend in float64 on the dequantised inputs.

The tolerance, from e4m3's rounding. The reference attends exactly the values the kernel reads
(q, k, v dequantised: their rounding is the input's, not the kernel's), so the kernel's own error
comes from one place: each probability p_j, times its key's V scale over the tile's largest (c), is
rounded to e4m3 before P.V. e4m3 keeps 3 mantissa bits: a value in the normal range (>= 2^-6) moves
by at most 2^-4 of itself, a subnormal one by at most 2^-10 (half the step 2^-9). So per output row

    |out - ref| <= 2^-4 * sum_j p_j |v_j| / l + n_kv * 2^-18 * max|v|

(the second term: 2^-10 in units of c <= max|v| / (448 * 256), times |v_j| <= 448 * v_scale_j, per
key, l >= 1), plus the output's own rounding (bf16 on the GPU: 2^-8 of |out|). The scores and the
LSE are float32 sums of exact e4m3 products: LSE within 1e-4. Rounding to nearest leaves an error spread evenly
over +-half a step, whose mean size is half the bound for one key and less when keys average out,
so the mean error must also stay below half the mean bound: a biased rounding (truncation) averages
about the whole bound, and a dropped or misplaced scale far more.

CPU: TRITON_INTERPRET=1 at small sizes (odd lengths, GQA, empty rows, each DCA region's shape, a
V laid out token-minor); its cast to e4m3 is replaced by an explicit rounding (flash_attn's
``_round_e4m3``). GPU (-m gpu): 7B-1M shapes, bf16 output.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from qwen1m.attention.fp8 import Fp8Tensor, emulate, fp8_attend, quantize
from qwen1m.attention.reference import attend
from qwen1m.kernels.flash_attn_fp8 import flash_attn_fp8

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests run through TRITON_INTERPRET=1")


def make_fp8(num_q, num_kv, num_heads, num_kv_heads, head_dim, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(num_q, num_heads, head_dim, generator=g, device=device) * 1.5
    k = torch.randn(num_kv, num_kv_heads, head_dim, generator=g, device=device) * 2.0
    # V's magnitude varies by token, so the per-key V scales differ inside a tile
    v = torch.randn(num_kv, num_kv_heads, head_dim, generator=g, device=device)
    v = v * (0.1 + 3 * torch.rand(num_kv, num_kv_heads, 1, generator=g, device=device))
    return quantize(q), quantize(k), quantize(v)


def check_fp8(out, lse, q: Fp8Tensor, k: Fp8Tensor, v: Fp8Tensor, *, softmax_scale, causal, out_rel=0.0,
              reference=attend):
    """reference: ``attend``'s contract (the sparse kernel's test passes its masked oracle)."""
    qd, kd, vd = (t.dequantize(torch.float64) for t in (q, k, v))
    ref_out, ref_lse = reference(qd, kd, vd, softmax_scale=softmax_scale, causal=causal)
    assert not out.isnan().any() and not lse.isnan().any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert (out.permute(1, 0, 2)[empty] == 0).all()
    if (~empty).sum() == 0:
        return
    rows = ~empty.transpose(0, 1)
    abs_out, _ = reference(qd, kd, vd.abs(), softmax_scale=softmax_scale, causal=causal)  # sum p|v| / l
    bound = (2.0 ** -4 * abs_out + k.shape[0] * 2.0 ** -18 * vd.abs().max() + out_rel * ref_out.abs()
             + 1e-6)
    err = (out.double() - ref_out).abs()
    worst = (err / bound)[rows].max().item()
    assert worst <= 1.0, f"out error {worst:.3g}x the e4m3 bound"
    mean_ratio = (err[rows].mean() / bound[rows].mean()).item()
    assert mean_ratio < 0.5, f"mean error {mean_ratio:.3g} of the mean bound: not rounding noise"
    lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
    assert lse_err <= 1e-4, f"lse error {lse_err:.3g}"


# (num_q, num_kv, num_heads, num_kv_heads): odd lengths across the interpreter's 16-wide tiles,
# bottom-right causal with a prefix (num_q < num_kv), square causal (DCA's intra block), empty causal
# rows (num_q > num_kv), one query (decode-like), MHA and GQA 4/2 and 6/2
CASES = [(1, 1, 4, 2), (1, 77, 4, 2), (17, 17, 4, 4), (37, 37, 6, 2), (20, 53, 4, 2), (45, 30, 4, 2)]


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_q,num_kv,num_heads,num_kv_heads", CASES)
def test_fp8_kernel_within_the_e4m3_bound(num_q, num_kv, num_heads, num_kv_heads, causal):
    q, k, v = make_fp8(num_q, num_kv, num_heads, num_kv_heads, 32, seed=num_q * 100 + num_kv)
    scale = 1 / math.sqrt(32)
    out, lse = flash_attn_fp8(q.values, k.values, v.values, q.scale, k.scale, v.scale, softmax_scale=scale,
                              causal=causal, out_dtype=torch.float32)
    check_fp8(out, lse, q, k, v, softmax_scale=scale, causal=causal)


@cpu_only
def test_fp8_kernel_reads_strided_and_token_minor_layouts():
    """K / V as views of a wider cache (every other token) and V stored token-minor ([heads, D, N]
    contiguous, the layout FP8 tensor cores prefer for P.V): the same result as contiguous inputs."""
    q, k, v = make_fp8(29, 70, 4, 2, 32, seed=5)
    scale = 1 / math.sqrt(32)
    base, base_lse = flash_attn_fp8(q.values, k.values, v.values, q.scale, k.scale, v.scale,
                                    softmax_scale=scale, causal=True, out_dtype=torch.float32)
    wide = torch.zeros(140, 2, 2, 32, dtype=torch.float8_e4m3fn)
    wide[::2, :, 0], wide[::2, :, 1] = k.values, v.values
    scales = torch.zeros(140, 2, 2)
    scales[::2, :, 0], scales[::2, :, 1] = k.scale, v.scale
    k_view, v_view = wide[::2, :, 0], wide[::2, :, 1]
    v_minor = v.values.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # token stride 1
    for vv in (v_view, v_minor):
        out, lse = flash_attn_fp8(q.values, k_view, vv, q.scale, scales[::2, :, 0], scales[::2, :, 1],
                                  softmax_scale=scale, causal=True, out_dtype=torch.float32)
        assert torch.equal(out, base) and torch.equal(lse, base_lse)


@cpu_only
def test_fp8_attend_takes_16_bit_or_quantised_keys():
    """``fp8_attend`` quantises 16-bit k / v itself, or reads ``Fp8Tensor`` ones as they are (the
    FP8 cache's bytes): both give the same result."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(21, 4, 32, generator=g).bfloat16()
    k = torch.randn(40, 2, 32, generator=g).bfloat16()
    v = torch.randn(40, 2, 32, generator=g).bfloat16()
    a = fp8_attend(q, k, v, softmax_scale=0.2, causal=True)
    b = fp8_attend(q, quantize(k), quantize(v), softmax_scale=0.2, causal=True)
    assert a[0].dtype == torch.bfloat16 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    check_fp8(a[0].float(), a[1], quantize(q), quantize(k), quantize(v), softmax_scale=0.2, causal=True,
              out_rel=2.0 ** -8)


def test_fp8_attend_without_a_kernel_emulates_the_kernel(monkeypatch):
    """A CPU without the interpreter emulates the kernel (``attention.fp8.emulate``): within the same
    e4m3 bound of the float64 reference, P really rounded (not the reference on dequantised inputs),
    and within that bound of the kernel itself run at the emulation's tile."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, h, 16, generator=g) for n, h in ((40, 4), (61, 2), (61, 2)))
    qq, kq, vq = quantize(q), quantize(k), quantize(v)
    kernel = flash_attn_fp8(qq.values, kq.values, vq.values, qq.scale, kq.scale, vq.scale, softmax_scale=0.25,
                            causal=True, out_dtype=torch.float32)[0] if INTERPRET else None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out, lse = fp8_attend(q, k, v, softmax_scale=0.25, causal=True)
    check_fp8(out, lse, qq, kq, vq, softmax_scale=0.25, causal=True)
    plain, _ = attend(qq.dequantize(), kq.dequantize(), vq.dequantize(), softmax_scale=0.25, causal=True)
    assert not torch.equal(out, plain)
    assert torch.equal(emulate(qq, kq, vq, softmax_scale=0.25, causal=True)[0], out)
    if kernel is not None:  # the interpreter's tiles are 16 keys wide
        at_16, _ = emulate(qq, kq, vq, softmax_scale=0.25, causal=True, tile=16)
        check_fp8(at_16, lse, qq, kq, vq, softmax_scale=0.25, causal=True)
        abs_out, _ = attend(qq.dequantize(), kq.dequantize(), vq.dequantize().abs(), softmax_scale=0.25, causal=True)
        assert ((at_16 - kernel).abs() <= 2.0 ** -4 * abs_out + 1e-6).all()


def test_fp8_tensor_slices_values_and_scales_together():
    t = quantize(torch.randn(10, 2, 16))
    part = t[3:7]
    assert part.shape == (4, 2, 16) and torch.equal(part.scale, t.scale[3:7])
    assert torch.equal(part.dequantize(), t.dequantize()[3:7])


def test_fp8_kernel_rejects_bad_inputs_in_one_sentence():
    q, k, v = make_fp8(4, 8, 4, 2, 16)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        flash_attn_fp8(q.dequantize(), k.values, v.values, q.scale, k.scale, v.scale, softmax_scale=1.0,
                       causal=True)
    with pytest.raises(ValueError, match="scales must be float32"):
        flash_attn_fp8(q.values, k.values, v.values, q.scale, k.scale[:4], v.scale, softmax_scale=1.0,
                       causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("num_q,num_kv,causal", [(4096, 4096, True), (1000, 5000, True), (777, 3000, False),
                                                 (1, 9000, False)])
def test_fp8_kernel_gpu_7b_shapes(num_q, num_kv, causal):
    q, k, v = make_fp8(num_q, num_kv, 28, 4, 128, device="cuda", seed=num_q)
    scale = 1 / math.sqrt(128)
    out, lse = flash_attn_fp8(q.values, k.values, v.values, q.scale, k.scale, v.scale, softmax_scale=scale,
                              causal=causal, out_dtype=torch.bfloat16)
    check_fp8(out.float(), lse, q, k, v, softmax_scale=scale, causal=causal, out_rel=2.0 ** -8)


@cpu_only
def test_fp8_attend_copies_v_token_minor_if_the_cache_layout_cannot_be_built(monkeypatch, caplog):
    """An FP8 cache's V is head_dim-minor. Should the kernel not build for that layout (a Triton
    that cannot lower P.V from it), ``fp8_attend`` says so once and reads a token-minor copy: the same
    result. Any other error propagates."""
    import qwen1m.kernels.flash_attn_fp8 as fa

    g = torch.Generator().manual_seed(6)
    q = torch.randn(12, 4, 16, generator=g)
    k, v = quantize(torch.randn(30, 2, 16, generator=g)), quantize(torch.randn(30, 2, 16, generator=g))
    expected = fp8_attend(q, k, v, softmax_scale=0.25, causal=True)
    real = fa.flash_attn_fp8
    layouts = []

    def picky(q8, k8, v8, *args, **kwargs):
        layouts.append(v8.stride(0))
        if v8.stride(0) != 1:
            raise ImportError("no P.V from a head_dim-minor V here")
        return real(q8, k8, v8, *args, **kwargs)

    monkeypatch.setattr(fa, "flash_attn_fp8", picky)
    monkeypatch.setattr("qwen1m.attention.fp8._V_COPY_WARNED", False)
    got = fp8_attend(q, k, v, softmax_scale=0.25, causal=True)
    assert layouts == [2 * 16, 1] and "copied token-minor" in caplog.text
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(fa, "flash_attn_fp8", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        fp8_attend(q, k, v, softmax_scale=0.25, causal=True)


def test_quantize_in_pieces_equals_at_once(monkeypatch):
    """Long inputs are quantised in pieces (bounded float32 temporaries): the same values and scales,
    in either layout."""
    import qwen1m.attention.fp8 as fp8

    x = torch.randn(50, 2, 16)
    whole, whole_minor = quantize(x), quantize(x, token_minor=True)
    monkeypatch.setattr(fp8, "_QUANTISE_ROWS", 16)
    for token_minor, ref in ((False, whole), (True, whole_minor)):
        pieces = quantize(x, token_minor=token_minor)
        assert pieces.values.stride() == ref.values.stride()
        assert torch.equal(pieces.values.float(), ref.values.float()) and torch.equal(pieces.scale, ref.scale)


def test_the_emulation_uses_the_kernels_constants():
    """``fp8.emulate`` rounds P at the kernel's P_SCALE over tiles of the GPU kernel's BLOCK_N."""
    import qwen1m.attention.fp8 as fp8
    from qwen1m.kernels.flash_attn_fp8 import _fp8_config
    from qwen1m.kernels.fp8_tile import P_SCALE

    assert fp8.P_SCALE == float(P_SCALE.value if hasattr(P_SCALE, "value") else P_SCALE)
    assert fp8.EMULATED_TILE == _fp8_config(128, torch.device("cuda"))["BLOCK_N"]
