"""Everything a decode step does to its new q, k, v before attention, in one launch.

Per decode row b (one new token per sequence) at absolute position p = positions[b]:

  - RoPE positions: dense (dca=None): query p, key p (R = 1 query rotation). DCA (dca = (s, c),
    s = chunk_len, c = chunk_size, see ``qwen1m.rope.dca_positions``): key r = p mod s, queries
    intra r, succ min(r + s, c), inter min(2s - 1, c) (R = 3, in that order).
  - k[b] (every kv head) is rotated at the key position and multiplied by yarn_scale[b], then written
    with v[b] to the flat cache row slots[b] (the layer's cache viewed as [num_blocks * block_size,
    num_kv_heads, head_dim]); with no cache given (an fp8 cache, which write_slots quantises) the
    rotated, scaled k is returned instead.
  - q[b] (every head) is rotated at each query position and multiplied by yarn_scale[b]:
    q_out [R, batch, num_heads, head_dim], the layout ``paged_decode_attention_multi`` reads.

Why one kernel: the PyTorch path (``RotaryEmbedding.rotate`` four times, the YaRN multiplies and the
cache scatter) is ~25 tiny kernels per layer, each ~3 us even inside a CUDA graph, for a few KiB of
data. Here one program owns BLOCK_H heads of one row and one rotation: programs [0, NUM_Q_BLOCKS *
R) of grid axis 1 rotate query heads, block b % NUM_Q_BLOCKS at rotation b // NUM_Q_BLOCKS, the
rest rotate key heads and copy values. One rotation per program, not R: at 32K-1M positions the
libdevice cos / sin take their slow argument-reduction path, and three in a row made the launch
~11-13 us on the H200 (profile_decode, 2026-11-29) against a few us of memory traffic; only the
R rotations the attention launch reads are computed (R = 1 until a sequence passes one DCA chunk).

Numerics: bit for bit the PyTorch path (transformers' RoPE arithmetic):
    freqs = float32(position) * inv_freq                        (float32)
    cos = round_dt(cos(freqs) * attention_scaling), sin alike     (float32 maths, rounded to q's dtype)
    out = round_dt(round_dt(x * cos) + round_dt(rotate_half(x) * sin))
    out = round_dt(out * yarn_scale)
where round_dt rounds to q's dtype (to nearest even), as each torch op on bf16 / fp16 tensors does.
The head dim is handled as two halves (HF convention: rotate_half(x) = cat(-x2, x1), and cos / sin
repeat over the halves), so out1 = x1 c - x2 s and out2 = x2 c + x1 s; negation commutes with
rounding, so this is the same sequence of roundings.
  - GPU: cos / sin are libdevice's __nv_cosf / __nv_sinf, the functions torch's CUDA cos / sin call
    (tl.cos may lower to the approximate instruction, far off for arguments ~1e5), and the launch
    sets enable_fp_fusion=False so x1 c - x2 s is not contracted into an FMA (torch rounds each
    product). Each rounding is an explicit cast to q's dtype, widened back to float32.
  - Interpreter: numpy's cos / sin (within an ulp of torch's in float32), and float32 -> bfloat16
    casts there truncate, so bf16 rounding is done by hand on the bits (round to nearest even).

CUDA-graph capturable: no host reads of device tensors, outputs sized from shapes only.
Oracle and CPU fallback: ``decode_prep_reference`` (same signature, pure PyTorch).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from qwen1m.config import DCAConfig
from qwen1m.kernels.rounding import round_to

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Heads per program: a [16, head_dim / 2] tile per half keeps registers low at head_dim 128, and
# Qwen2.5-7B's 28 query heads + 4 kv heads become three programs per row.
_BLOCK_H = 16


@triton.jit
def _rope_scale(x1, x2, pos, inv_freq, attention_scaling, yarn,
                DTYPE: tl.constexpr, LIBDEVICE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Rotate [BLOCK_H, HALF] halves (float32 holding DTYPE values) at one integer position, times yarn."""
    freqs = pos.to(tl.float32) * inv_freq  # [HALF]; int64 -> float32 rounds to nearest, as torch's cast
    if LIBDEVICE:
        cos = libdevice.cos(freqs)
        sin = libdevice.sin(freqs)
    else:
        cos = tl.cos(freqs)
        sin = tl.sin(freqs)
    cos = round_to(cos * attention_scaling, DTYPE, MANUAL_BF16)[None, :]
    sin = round_to(sin * attention_scaling, DTYPE, MANUAL_BF16)[None, :]
    out1 = round_to(round_to(x1 * cos, DTYPE, MANUAL_BF16) - round_to(x2 * sin, DTYPE, MANUAL_BF16), DTYPE, MANUAL_BF16)
    out2 = round_to(round_to(x2 * cos, DTYPE, MANUAL_BF16) + round_to(x1 * sin, DTYPE, MANUAL_BF16), DTYPE, MANUAL_BF16)
    return round_to(out1 * yarn, DTYPE, MANUAL_BF16), round_to(out2 * yarn, DTYPE, MANUAL_BF16)


# chunk_len / chunk_size are runtime values even when 1 (no constexpr specialisation of the arithmetic)
@triton.jit(do_not_specialize=["chunk_len", "chunk_size"])
def _decode_prep_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, yarn_ptr, slots_ptr,
    q_out_ptr, k_dst_ptr, v_dst_ptr,
    attention_scaling, chunk_len, chunk_size, num_heads, num_kv_heads, block_size,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vd,
    stride_pos, stride_freq, stride_yarn, stride_slot,
    stride_oqr, stride_oqb, stride_oqh, stride_oqd,
    stride_kdb, stride_kdt, stride_kdh, stride_kdd,
    stride_vdb, stride_vdt, stride_vdh, stride_vdd,
    NUM_Q_BLOCKS: tl.constexpr, NUM_RANGES: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
    DCA: tl.constexpr, TO_CACHE: tl.constexpr, LIBDEVICE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    DTYPE: tl.constexpr = q_out_ptr.dtype.element_ty
    row64 = row.to(tl.int64)
    p = tl.load(pos_ptr + row64 * stride_pos).to(tl.int64)
    yarn = tl.load(yarn_ptr + row64 * stride_yarn).to(tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    inv_freq = tl.load(inv_freq_ptr + offs_d * stride_freq)
    if DCA:
        r = p % chunk_len  # the key's (and intra query's) position
    else:
        r = p

    if blk < NUM_Q_BLOCKS * NUM_RANGES:  # query heads [qb * BLOCK_H, ...) at rotation rng
        rng = blk // NUM_Q_BLOCKS
        head = (blk % NUM_Q_BLOCKS) * BLOCK_H + offs_h
        ok = (head < num_heads)[:, None]
        src = q_ptr + row64 * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF * stride_qd, mask=ok, other=0.0).to(tl.float32)
        if DCA:  # intra r, succ min(r + s, c), inter min(2s - 1, c)
            q_pos = tl.where(rng == 0, r, tl.where(rng == 1, tl.minimum(r + chunk_len, chunk_size),
                                                   tl.minimum(2 * chunk_len - 1, chunk_size)))
        else:
            q_pos = r
        dst = (q_out_ptr + rng * stride_oqr + row64 * stride_oqb + head[:, None] * stride_oqh
               + offs_d[None, :] * stride_oqd)
        o1, o2 = _rope_scale(x1, x2, q_pos, inv_freq, attention_scaling, yarn, DTYPE, LIBDEVICE, MANUAL_BF16)
        tl.store(dst, o1.to(DTYPE), mask=ok)
        tl.store(dst + HALF * stride_oqd, o2.to(DTYPE), mask=ok)
    else:  # kv heads: k rotated at the key position and scaled, v copied
        head = (blk - NUM_Q_BLOCKS * NUM_RANGES) * BLOCK_H + offs_h
        ok = (head < num_kv_heads)[:, None]
        src = k_ptr + row64 * stride_kb + head[:, None] * stride_kh + offs_d[None, :] * stride_kd
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF * stride_kd, mask=ok, other=0.0).to(tl.float32)
        o1, o2 = _rope_scale(x1, x2, r, inv_freq, attention_scaling, yarn, DTYPE, LIBDEVICE, MANUAL_BF16)
        # destination row: the cache row slots[b], or row b of the returned k ([B, 1, kvh, d], block_size 1)
        if TO_CACHE:
            slot = tl.load(slots_ptr + row64 * stride_slot).to(tl.int64)
        else:
            slot = row64
        blk_idx = slot // block_size
        blk_off = slot % block_size
        dst = (k_dst_ptr + blk_idx * stride_kdb + blk_off * stride_kdt + head[:, None] * stride_kdh
               + offs_d[None, :] * stride_kdd)
        tl.store(dst, o1.to(DTYPE), mask=ok)
        tl.store(dst + HALF * stride_kdd, o2.to(DTYPE), mask=ok)
        if TO_CACHE:
            offs_v = tl.arange(0, 2 * HALF)
            v = tl.load(v_ptr + row64 * stride_vb + head[:, None] * stride_vh + offs_v[None, :] * stride_vd,
                        mask=ok, other=0.0)
            tl.store(v_dst_ptr + blk_idx * stride_vdb + blk_off * stride_vdt + head[:, None] * stride_vdh
                     + offs_v[None, :] * stride_vdd, v, mask=ok)


def _dca_pair(dca) -> tuple[int, int] | None:
    """dca: None, (chunk_len s, chunk_size c) or a DCAConfig -> (s, c) or None."""
    if dca is None:
        return None
    if isinstance(dca, DCAConfig):
        return dca.chunk_len, dca.chunk_size
    s, c = (int(x) for x in dca)
    if not 0 < s < c:
        raise ValueError(f"decode_prep: dca must be (chunk_len s, chunk_size c) with 0 < s < c, got {dca}.")
    return s, c


def _num_ranges(pair: tuple[int, int] | None, num_ranges: int | None) -> int:
    if pair is None:
        if num_ranges not in (None, 1):
            raise ValueError(f"decode_prep: without DCA there is one query rotation, got num_ranges={num_ranges}.")
        return 1
    if num_ranges is None:
        return 3
    if num_ranges not in (1, 2, 3):
        raise ValueError(f"decode_prep: num_ranges must be 1, 2 or 3 with DCA, got {num_ranges}.")
    return num_ranges


def _check(q, k, v, positions, inv_freq, yarn_scale, k_cache, v_cache, slots) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            "decode_prep expects q [batch, num_heads, head_dim] and k, v [batch, num_kv_heads, head_dim], "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    batch, _, head_dim = q.shape
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"decode_prep supports a power-of-two head_dim, got {head_dim}.")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_prep: q, k, v must share one of float16/bfloat16/float32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}.")
    if tuple(positions.shape) != (batch,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"decode_prep: positions must be int64 [batch={batch}], got "
                         f"{positions.dtype} {tuple(positions.shape)}.")
    if tuple(inv_freq.shape) != (head_dim // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"decode_prep: inv_freq must be float32 [head_dim / 2 = {head_dim // 2}], got "
                         f"{inv_freq.dtype} {tuple(inv_freq.shape)}.")
    if yarn_scale.numel() != batch:
        raise ValueError(f"decode_prep: yarn_scale must hold batch={batch} values, got {tuple(yarn_scale.shape)}.")
    if (k_cache is None) != (v_cache is None):
        raise ValueError("decode_prep: give both k_cache and v_cache, or neither.")
    if k_cache is not None:
        want = (k.shape[1], head_dim)
        if (k_cache.dim() != 4 or v_cache.shape != k_cache.shape or tuple(k_cache.shape[2:]) != want
                or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
            raise ValueError(
                f"decode_prep: k_cache, v_cache must be {q.dtype} [num_blocks, block_size, {want[0]}, {want[1]}] "
                f"(an fp8 cache: pass None and quantise the returned k with write_slots), got "
                f"{k_cache.dtype} {tuple(k_cache.shape)} and {v_cache.dtype} {tuple(v_cache.shape)}."
            )
        if tuple(slots.shape) != (batch,) or slots.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"decode_prep: slots must be int64 [batch={batch}], got {slots.dtype} {tuple(slots.shape)}."
            )


def decode_prep(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    yarn_scale: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slots: torch.Tensor | None,
    dca: tuple[int, int] | DCAConfig | None = None,
    num_ranges: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE (dense or the three DCA query rotations), YaRN scale and the cache write of a decode
    batch, in one launch.

    q: [B, num_heads, head_dim]; k, v: [B, num_kv_heads, head_dim] (any strides, e.g. views of the
    fused qkv projection; nothing is copied); positions: [B] int64 absolute positions; inv_freq:
    [head_dim / 2] float32 on q's device; attention_scaling: the rotary's cos / sin factor;
    yarn_scale: B values (any shape, e.g. [B, 1, 1]) in q's dtype, multiplying q and k (ones without
    DCA); k_cache, v_cache: one layer's cache [num_blocks, block_size, num_kv_heads, head_dim] in q's
    dtype, or None (then nothing is written and the rotated k is returned, e.g. for an fp8 cache);
    slots: [B] int64 flat cache rows of the new tokens (unused without a cache); dca: None (dense)
    or (chunk_len, chunk_size) (or a DCAConfig); num_ranges: with DCA, how many of the rotations
    intra, succ, inter to compute, in that order (1-3, default 3: the attention launch reads only the
    batch's non-empty ranges); dense: 1.
    Returns q_out [R, B, num_heads, head_dim] in q's dtype (R = 1 dense; R = num_ranges DCA: intra,
    succ, inter) and k_rot [B, num_kv_heads, head_dim] (None when the cache was written).
    """
    _check(q, k, v, positions, inv_freq, yarn_scale, k_cache, v_cache, slots)
    pair = _dca_pair(dca)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_ranges = _num_ranges(pair, num_ranges)
    q_out = torch.empty((num_ranges, batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    to_cache = k_cache is not None
    if to_cache:
        k_dst, v_dst, block_size = k_cache, v_cache, k_cache.shape[1]
        k_rot = None
    else:  # row b of k_rot seen as cache row b of a [B, 1, kvh, d] "cache"
        k_rot = torch.empty((batch, num_kv_heads, head_dim), dtype=q.dtype, device=q.device)
        k_dst = v_dst = k_rot[:, None]
        block_size = 1
        slots = positions  # never read
    if batch == 0:
        return q_out, k_rot
    yarn = yarn_scale.reshape(batch)
    if yarn.dtype != q.dtype:
        yarn = yarn.to(q.dtype)
    s, c = pair if pair is not None else (1, 1)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    block_h = min(_BLOCK_H, triton.next_power_of_2(max(num_heads, num_kv_heads)))
    nqb, nkb = triton.cdiv(num_heads, block_h), triton.cdiv(num_kv_heads, block_h)
    _decode_prep_kernel[(batch, nqb * num_ranges + nkb)](
        q, k, v, positions, inv_freq, yarn, slots, q_out, k_dst, v_dst,
        float(attention_scaling), s, c, num_heads, num_kv_heads, block_size,
        *q.stride(), *k.stride(), *v.stride(),
        positions.stride(0), inv_freq.stride(0), yarn.stride(0), slots.stride(0),
        *q_out.stride(), *k_dst.stride(), *v_dst.stride(),
        NUM_Q_BLOCKS=nqb, NUM_RANGES=num_ranges, BLOCK_H=block_h, HALF=head_dim // 2,
        DCA=pair is not None, TO_CACHE=to_cache, LIBDEVICE=not interpret, MANUAL_BF16=interpret,
        num_warps=4,
        enable_fp_fusion=False,  # torch rounds x * cos and x2 * sin separately: no FMA
    )
    return q_out, k_rot


def decode_prep_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    yarn_scale: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slots: torch.Tensor | None,
    dca: tuple[int, int] | DCAConfig | None = None,
    num_ranges: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``decode_prep`` in PyTorch (oracle and CPU fallback): RotaryEmbedding.rotate and dca_positions,
    exactly the maths of the backends' per-range decode path."""
    from qwen1m.rope import RotaryEmbedding, dca_positions

    _check(q, k, v, positions, inv_freq, yarn_scale, k_cache, v_cache, slots)
    pair = _dca_pair(dca)
    rotary = RotaryEmbedding(q.shape[-1], 10000.0)  # then given the caller's frequencies and scaling
    rotary.inv_freq = inv_freq
    rotary.attention_scaling = attention_scaling
    scale = yarn_scale.reshape(-1, 1, 1).to(q.dtype)
    positions = positions.long()
    if pair is None:
        key_pos, query_pos = positions, [positions]
    else:
        s, c = pair
        pos = dca_positions(positions, DCAConfig(chunk_size=c, local_size=c - s))
        key_pos, query_pos = pos.key, [pos.intra, pos.succ, pos.inter][:_num_ranges(pair, num_ranges)]
    q_out = torch.stack([rotary.rotate(q, p) * scale for p in query_pos])
    k_rot = rotary.rotate(k, key_pos) * scale
    if k_cache is None:
        return q_out, k_rot
    kf = k_cache.view(-1, *k_cache.shape[2:])
    vf = v_cache.view(-1, *v_cache.shape[2:])
    kf[slots], vf[slots] = k_rot, v
    return q_out, None


__all__ = ["decode_prep", "decode_prep_reference"]
