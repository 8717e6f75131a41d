"""DCA attention against plain RoPE (short contexts) and an independent dense oracle (design §2.2 table).

The oracle shares no code with ``dca.py``: it builds the relative distance r(i, j) of every (query,
key) pair from design §2.2's table, rotates q_i by r in float64 with its own RoPE (RoPE scores depend
only on pos_q - pos_k, so <rot(q, r), rot(k, 0)> is the DCA score), and does one softmax per row.
"""

from __future__ import annotations

import functools
import math
import resource

import pytest
import torch

from qwen1m.attention.dca import dca_attention
from qwen1m.attention.dca_rope import needed_rotations, rotate_for_dca
from qwen1m.attention.reference import attend
from qwen1m.config import DCAConfig
from qwen1m.rope import RotaryEmbedding

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BASE = 4, 2, 16, 10000.0
SMALL = DCAConfig(chunk_size=16, local_size=4)  # s = 12
SMALL_YARN = DCAConfig(chunk_size=16, local_size=4, original_max_position_embeddings=16)  # m > 1 past 16


def _qkv(length: int, seed: int, num_heads: int = NUM_HEADS, num_kv_heads: int = NUM_KV_HEADS,
         dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(length, num_heads, HEAD_DIM, generator=g)  # x2: peaked rows, position errors show
    k = torch.randn(length, num_kv_heads, HEAD_DIM, generator=g)
    v = torch.randn(length, num_kv_heads, HEAD_DIM, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _schedule(kind: str, length: int) -> tuple[list[int], int]:
    """Step sizes feeding ``length`` tokens, and the prompt length (the rest is decoded one by one)."""
    if kind == "one_shot":
        return [length], length
    if kind == "chunked":  # prefill chunks of 1, 5, 7, ... tokens: they straddle DCA chunks
        steps, left, sizes = [], length, [1, 5, 7]
        while left:
            steps.append(min(sizes[len(steps) % 3], left))
            left -= steps[-1]
        return steps, length
    assert kind == "decode"
    return [length - 4, 1, 1, 1, 1], length - 4


def _run_dca(q, k, v, dca, steps, prompt_len, attend_fn=attend):
    """Feed the tokens step by step as an engine would: rotate, write the cache, attend to all so far."""
    length = q.shape[0]
    rotary = RotaryEmbedding(HEAD_DIM, BASE)
    # K and V interleaved in one buffer so the tensors dca_attention gets are strided cache views.
    cache = torch.zeros(length, 2 * k.shape[1], HEAD_DIM, dtype=k.dtype)
    k_cache, v_cache = cache[:, : k.shape[1]], cache[:, k.shape[1] :]
    outs, lses, begin = [], [], 0
    for n in steps:
        end = begin + n
        # only the rotations this step reads, as the backend does (the oracle tests then cover it)
        q_intra, q_succ, q_inter, k_rot, scale = rotate_for_dca(
            q[begin:end], k[begin:end], torch.arange(begin, end), rotary, dca, max(prompt_len, end),
            needed_rotations(end, dca)
        )
        k_cache[begin:end] = k_rot
        v_cache[begin:end] = v[begin:end]
        out, lse = dca_attention(q_intra, q_succ, q_inter, k_cache[:end], v_cache[:end], begin=begin,
                                 dca=dca, softmax_scale=scale, attend_fn=attend_fn)
        assert out.shape == (n, q.shape[1], HEAD_DIM) and out.dtype == q.dtype
        assert lse.shape == (q.shape[1], n) and lse.dtype == torch.float32
        outs.append(out)
        lses.append(lse)
        begin = end
    return torch.cat(outs), torch.cat(lses, dim=1)


def _yarn_m(length: int, orig: int) -> float:
    return 1.0 if orig <= 0 else max(1.0, 0.1 * math.log(length / orig) + 1.0)


def _token_m(steps: list[int], prompt_len: int, orig: int) -> torch.Tensor:
    """m of each token: its step's L_req = max(prompt_len, step end) scales its query and its key."""
    ms, end = [], 0
    for n in steps:
        end += n
        ms += [_yarn_m(max(prompt_len, end), orig)] * n
    return torch.tensor(ms, dtype=torch.float64)


def _rope64(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """float64 RoPE, half-split convention; x [..., head_dim], pos broadcastable to x.shape[:-1]."""
    inv_freq = 1.0 / BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    ang = pos.to(torch.float64)[..., None] * inv_freq
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    half = HEAD_DIM // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _dense_oracle(q, k, v, dca: DCAConfig, m: torch.Tensor, rows: list[int] | None = None):
    """Row-by-row DCA from the design §2.2 table; q, k, v raw (unrotated); m [num_tokens] YaRN factors.

    Returns out [len(rows), num_heads, head_dim] and lse [num_heads, len(rows)], float64.
    """
    s, c = dca.chunk_len, dca.chunk_size
    group = q.shape[1] // k.shape[1]
    rows = list(range(q.shape[0])) if rows is None else rows
    out = torch.zeros(len(rows), q.shape[1], HEAD_DIM, dtype=torch.float64)
    lse = torch.zeros(q.shape[1], len(rows), dtype=torch.float64)
    for n, i in enumerate(rows):
        j = torch.arange(i + 1)
        ip, jp = i % s, j % s
        intra, succ = j // s == i // s, j // s == i // s - 1
        r = torch.where(intra, ip - jp, torch.where(succ, min(ip + s, c) - jp, c - jp))
        qr = _rope64(q[i].double()[None], r[:, None])  # [i+1, num_heads, head_dim]
        kg = k[: i + 1].double().repeat_interleave(group, dim=1)
        vg = v[: i + 1].double().repeat_interleave(group, dim=1)
        scores = (qr * kg).sum(-1) * (m[i] * m[: i + 1, None]) / math.sqrt(HEAD_DIM)  # [i+1, num_heads]
        out[n] = torch.einsum("jh,jhd->hd", torch.softmax(scores, dim=0), vg)
        lse[:, n] = torch.logsumexp(scores, dim=0)
    return out, lse


@pytest.mark.parametrize("length", [8, 12, 16])  # L <= s and s < L <= c
@pytest.mark.parametrize("kind", ["one_shot", "chunked", "decode"])
def test_equals_plain_rope_within_c(length, kind):
    q, k, v = _qkv(length, seed=length)
    steps, prompt_len = _schedule(kind, length)
    out, _ = _run_dca(q, k, v, SMALL, steps, prompt_len)
    rotary = RotaryEmbedding(HEAD_DIM, BASE)
    p = torch.arange(length)
    plain, _ = attend(rotary.rotate(q, p), rotary.rotate(k, p), v, softmax_scale=HEAD_DIM**-0.5, causal=True)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_oracle_is_not_plain_rope_beyond_c():
    """Guards the oracle tests below: past c, DCA must change the result, or they would prove nothing."""
    q, k, v = _qkv(30, seed=1)
    p = torch.arange(30)
    rotary = RotaryEmbedding(HEAD_DIM, BASE)
    plain, _ = attend(rotary.rotate(q, p), rotary.rotate(k, p), v, softmax_scale=HEAD_DIM**-0.5, causal=True)
    oracle, _ = _dense_oracle(q, k, v, SMALL, torch.ones(30, dtype=torch.float64))
    assert (oracle[SMALL.chunk_size + 1 :] - plain[SMALL.chunk_size + 1 :]).abs().max() > 1e-2


@pytest.mark.parametrize("length", [13, 30, 65])  # crosses 1, 2 and 5 DCA chunk boundaries (s = 12)
@pytest.mark.parametrize("kind", ["one_shot", "chunked", "decode"])
@pytest.mark.parametrize("dca", [SMALL, SMALL_YARN], ids=["no_yarn", "yarn"])
def test_matches_dense_oracle(length, kind, dca):
    q, k, v = _qkv(length, seed=100 + length)
    steps, prompt_len = _schedule(kind, length)
    out, lse = _run_dca(q, k, v, dca, steps, prompt_len)
    m = _token_m(steps, prompt_len, dca.original_max_position_embeddings)
    ref_out, ref_lse = _dense_oracle(q, k, v, dca, m)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_attend_fn_plug():
    """Every call goes through attend_fn on a contiguous slice of the cache, causal calls are square."""
    calls = []

    def recording_attend(q, k, v, *, softmax_scale, causal):
        calls.append((q.shape[0], k.shape[0], causal, k.untyped_storage().data_ptr()))
        return attend(q, k, v, softmax_scale=softmax_scale, causal=causal)

    q, k, v = _qkv(65, seed=3)
    steps, prompt_len = [1, 5, 7, 20, 28, 1, 1, 1, 1], 61
    out, _ = _run_dca(q, k, v, SMALL, steps, prompt_len, attend_fn=recording_attend)
    expected, _ = _run_dca(q, k, v, SMALL, steps, prompt_len)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert calls and any(c for _, _, c, _ in calls) and not all(c for _, _, c, _ in calls)
    for num_q, num_kv, causal, _ in calls:
        assert not causal or num_q == num_kv, (num_q, num_kv)
    assert len({ptr for *_, ptr in calls}) == 1, "K/V were copied instead of sliced from the cache"
    # The last decode step (token 64, DCA chunk [60, 72)): intra [60, 65), succ [48, 60), inter [0, 48).
    assert sorted(calls[-3:]) == sorted([(1, 5, False, calls[-1][3]), (1, 12, False, calls[-1][3]),
                                         (1, 48, False, calls[-1][3])])


def test_low_precision_dtype_and_shapes():
    q, k, v = _qkv(30, seed=5, dtype=torch.bfloat16)
    out, lse = _run_dca(q, k, v, SMALL_YARN, [7, 23], 30)
    ref, _ = _dense_oracle(q, k, v, SMALL_YARN, _token_m([7, 23], 30, 16))
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.05)


def test_rejects_wrong_key_count():
    q, k, v = _qkv(10, seed=0)
    with pytest.raises(ValueError, match="begin \\+ num_q"):
        dca_attention(q[5:], q[5:], q[5:], k[:9], v[:9], begin=5, dca=SMALL, softmax_scale=0.25)


@pytest.mark.slow
def test_64k_tokens_bounded_memory():
    length = 1 << 16
    dca = DCAConfig(chunk_size=4096, local_size=512, original_max_position_embeddings=16384)  # 19 chunks, m>1
    q, k, v = _qkv(length, seed=11, num_heads=1, num_kv_heads=1, dtype=torch.float32)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    small_blocks = functools.partial(attend, max_scores=1 << 22)  # 16 MiB of scores per block
    out, lse = _run_dca(q, k, v, dca, [length], length, attend_fn=small_blocks)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    assert grown_gib < 2, f"peak RSS grew by {grown_gib:.1f} GiB; an N x N float32 matrix is 16 GiB"
    assert out.shape == (length, 1, HEAD_DIM) and torch.isfinite(out).all() and torch.isfinite(lse).all()
    rows = [0, 3583, 3584, 7200, 40000, length - 1] + torch.randint(0, length, (3,)).tolist()
    m = torch.full((length,), _yarn_m(length, 16384), dtype=torch.float64)
    ref_out, ref_lse = _dense_oracle(q, k, v, dca, m, rows)
    torch.testing.assert_close(out[rows].double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse[:, rows].double(), ref_lse, rtol=1e-4, atol=1e-4)


def test_decode_ranges_leave_out_ranges_empty_for_the_whole_batch():
    """Design §2.4 per sequence (intra [n s, L), succ [(n-1) s, n s), inter [0, (n-1) s), n = (L-1) // s),
    with only as many ranges as the batch's largest n needs."""
    from types import SimpleNamespace

    from qwen1m.attention.metadata import _dca_decode_ranges

    def ranges(*lengths):
        return _dca_decode_ranges([SimpleNamespace(num_total=L) for L in lengths], 10).tolist()

    assert ranges(1, 10) == [[[0, 0]], [[1, 10]]]  # n = 0 for both: intra only
    assert ranges(5, 11) == [[[0, 10], [0, 0]], [[5, 11], [0, 10]]]  # n = 1: intra, succ
    assert ranges(5, 31) == [[[0, 30], [0, 20], [0, 0]], [[5, 31], [0, 30], [0, 20]]]  # n = 3: all three
    assert ranges(21, 45) == [[[20, 40], [10, 30], [0, 0]], [[21, 45], [20, 40], [10, 30]]]


def test_needed_rotations_follow_the_chunk_of_the_last_query():
    # s = 12: positions 0..11 are chunk 0, 12..23 chunk 1, 24.. chunk 2 and later
    assert [needed_rotations(n, SMALL) for n in (1, 12, 13, 24, 25, 200)] == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("begin,num_q", [(0, 12), (5, 7), (10, 3), (12, 12), (20, 9), (30, 30)])
def test_skipped_rotations_give_the_same_attention(begin, num_q):
    """The copies ``needed_rotations`` skips are never read: same output as with all three."""
    q, k, v = _qkv(begin + num_q, seed=11)
    rotary = RotaryEmbedding(HEAD_DIM, BASE)
    pos = torch.arange(begin, begin + num_q)
    full = rotate_for_dca(q, k, torch.arange(begin + num_q), rotary, SMALL, begin + num_q)
    k_rot = full[3]
    n = needed_rotations(begin + num_q, SMALL)
    lazy = rotate_for_dca(q[begin:], k[begin:], pos, rotary, SMALL, begin + num_q, n)
    assert (lazy[1] is None) == (n < 2) and (lazy[2] is None) == (n < 3)
    want = dca_attention(*(t[begin:] for t in full[:3]), k_rot, v, begin=begin, dca=SMALL, softmax_scale=full[4])
    got = dca_attention(*lazy[:3], k_rot, v, begin=begin, dca=SMALL, softmax_scale=lazy[4])
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_a_missing_rotation_that_is_needed_is_a_clear_error():
    q, k, v = _qkv(26, seed=12)
    rotary = RotaryEmbedding(HEAD_DIM, BASE)
    q_intra, q_succ, _, k_rot, scale = rotate_for_dca(q, k, torch.arange(26), rotary, SMALL, 26, 2)
    with pytest.raises(ValueError, match="reach DCA chunk 2, which needs q_succ and q_inter"):
        dca_attention(q_intra, q_succ, None, k_rot, v, begin=0, dca=SMALL, softmax_scale=scale)
    with pytest.raises(ValueError, match="num_rotations must be 1, 2 or 3"):
        rotate_for_dca(q, k, torch.arange(26), rotary, SMALL, 26, 0)
