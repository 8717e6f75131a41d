"""The CPU attend dispatch (torch's CPU flash attention where exact) equals the reference."""

from __future__ import annotations

import pytest
import torch

from qwen1m.attention.ops import get_attend_fn
from qwen1m.attention.reference import attend


@pytest.mark.parametrize("num_q,num_kv,causal", [(37, 37, True), (1, 50, True), (20, 90, False), (17, 40, True),
                                                 (5, 0, False)])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 1)])
def test_cpu_attend_equals_reference(num_q, num_kv, causal, heads):
    g = torch.Generator().manual_seed(num_q * 31 + num_kv)
    h, kvh = heads
    q = torch.randn(num_q, h, 32, generator=g)
    k = torch.randn(num_kv, kvh, 32, generator=g)
    v = torch.randn(num_kv, kvh, 32, generator=g)
    fn = get_attend_fn(torch.device("cpu"))
    out, lse = fn(q, k, v, softmax_scale=0.2, causal=causal)
    ref, ref_lse = attend(q.double(), k.double(), v.double(), softmax_scale=0.2, causal=causal)
    assert out.shape == (num_q, h, 32) and lse.shape == (h, num_q) and lse.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse.double()[fin], ref_lse[fin], atol=1e-5)
