"""attention_dtype="fp8" through the whole model: the option's wiring, the FP8 cache read as stored, and
greedy tokens equal to the model dtype's.

Why N = 32 tokens. Measured on this tiny random checkpoint (float32, CPU, the FP8 kernel under the
interpreter, P rounded to e4m3; the decode steps in float32, as on every device) over the 8 prompts of
``_prompt`` (150 + 37 i random tokens, greedy, 64 new tokens, dense and DCA with chunk 128): FP8 and
float32 prefill gave the same 64 tokens for every prompt but one, whose first difference came at token
60 (prompt 1, DCA). Random weights have near-ties in their logits that any rounding can flip; 32 is
the largest power of two below the worst case seen, checked on that prompt and three others.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.attention.fp8 import Fp8Tensor, fp8_attend
from qwen1m.cache.paged_kv import PagedKVCache, SequenceBlocks, write_slots
from qwen1m.config import DCAConfig
from qwen1m.errors import ConfigError

N_EQUAL = 32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DCA = DCAConfig(chunk_size=128, local_size=32, original_max_position_embeddings=64)


def _prompt(i: int) -> list[int]:
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 97, (150 + 37 * i,), generator=g).tolist()


@pytest.mark.parametrize("dca", [None, DCA], ids=["dense", "dca"])
def test_fp8_greedy_tokens_equal_the_model_dtype(tiny_checkpoint, dca):
    params = SamplingParams(max_tokens=N_EQUAL, temperature=0, ignore_eos=True)
    prompts = [_prompt(i) for i in (0, 1, 2, 5)]
    outs = {}
    for mode in ("auto", "fp8"):
        llm = LLM(model=str(tiny_checkpoint), dtype="float32", device="cpu", attention_dtype=mode,
                  dca=dca or False, max_model_len=1024)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["fp8"] == outs["auto"]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fp8_attention_reaches_the_prefill(tiny_checkpoint, monkeypatch, kv_cache_dtype):
    """The option reaches the attention: one FP8 call per layer in prefill, none in decode; with an
    FP8 cache its keys come as stored (``view_stored_fp8``), with a 16-bit cache quantised."""
    import qwen1m.attention.fp8 as fp8
    from qwen1m.cache.paged_kv import SequenceBlocks as Blocks

    calls, stored = [], []
    real, real_view = fp8.fp8_attend, Blocks.view_stored_fp8

    def counting(q, k, v, **kwargs):
        calls.append(isinstance(k, Fp8Tensor) and isinstance(v, Fp8Tensor))
        return real(q, k, v, **kwargs)

    def spying(self, layer, end):
        stored.append(layer)
        return real_view(self, layer, end)

    monkeypatch.setattr(fp8, "fp8_attend", counting)
    monkeypatch.setattr(Blocks, "view_stored_fp8", spying)
    llm = LLM(model=str(tiny_checkpoint), dtype="float32", device="cpu", attention_dtype="fp8",
              kv_cache_dtype=kv_cache_dtype, max_model_len=512)
    llm.generate([_prompt(3)], SamplingParams(max_tokens=2, temperature=0))
    assert calls == [True, True]  # 2 layers, prefill only: the decode step keeps float32
    assert stored == ([0, 1] if kv_cache_dtype == "fp8" else [])


def test_fp8_cache_is_read_as_stored():
    """``view_stored_fp8`` of an FP8 cache hands the kernel the stored bytes and scales (no dequantised
    copy): attending them equals attending the dequantised view, quantised again."""
    cache = PagedKVCache(1, 8, 16, 2, 32, torch.float32, torch.device("cpu"), fp8=True)
    seq = SequenceBlocks(cache, [2, 3, 4, 5], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(50, 2, 32, generator=g), torch.randn(50, 2, 32, generator=g)
    write_slots(cache, 0, slice(2 * 16, 2 * 16 + 50), k, v)
    k8, ks, v8, vs = seq.view_stored_fp8(0, 50)
    kq, vq = Fp8Tensor(k8, ks), Fp8Tensor(v8, vs)
    kd, vd = seq.view(0, 50)
    assert kq.values.dtype == torch.float8_e4m3fn
    assert kq.values.data_ptr() == cache.k[0].view(-1, 2, 32)[32:].data_ptr()  # a view, not a copy
    assert torch.equal(kq.dequantize(), kd) and torch.equal(vq.dequantize(), vd)
    q = torch.randn(10, 4, 32, generator=g)
    a = fp8_attend(q, kq, vq, softmax_scale=1 / math.sqrt(32), causal=True)
    b = fp8_attend(q, kd, vd, softmax_scale=1 / math.sqrt(32), causal=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_attention_dtype_is_checked_in_one_sentence(tiny_checkpoint):
    with pytest.raises(ConfigError, match="attention_dtype"):
        LLM(model=str(tiny_checkpoint), device="cpu", attention_dtype="int4")


@pytest.mark.skipif(not INTERPRET, reason="the batched path's Triton kernels: TRITON_INTERPRET=1")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fp8_attention_reaches_the_sparse_kernels(tmp_path, monkeypatch, kv_cache_dtype):
    """With a sparse config the batched sparse path (forced on the CPU, as on CUDA by default) attends
    in e4m3: every sparse step's attention groups get FP8 inputs (an FP8 cache's stored bytes), and the
    greedy tokens equal the 16-bit sparse model's for N_EQUAL tokens."""
    import dataclasses

    import qwen1m.attention.sparse_batched as sb
    import qwen1m.attention.sparse_prefill as sp
    from qwen1m.cache.paged_kv import SequenceBlocks as Blocks
    from qwen1m.sparse_config import SparseConfig

    monkeypatch.setattr(sp, "_use_batched", lambda *a: True)
    groups, stored = [], []
    real_group, real_view = sb._attend_group, Blocks.view_stored_fp8

    def spy(*args, **kwargs):
        groups.append(kwargs["attn"][0].dtype == torch.float8_e4m3fn)
        return real_group(*args, **kwargs)

    def spying(self, layer, end):
        stored.append(layer)
        return real_view(self, layer, end)

    monkeypatch.setattr(sb, "_attend_group", spy)
    monkeypatch.setattr(Blocks, "view_stored_fp8", spying)
    folder = save_tiny_checkpoint(tmp_path / "m", seed=7, extra_config={"dual_chunk_attention_config": {
        "chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 32}})
    cfg = SparseConfig.uniform(2, 4, 24, 48, threshold=64, last_q=16, block_size=16, dense_above_density=0.6)
    opts = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, enforce_eager=True,
                kv_cache_dtype=kv_cache_dtype, sparse_attention_config=dataclasses.replace(cfg, dense_hint_growth=0.0))
    params = SamplingParams(max_tokens=N_EQUAL, temperature=0, ignore_eos=True)
    prompt = _prompt(0)  # 150 tokens: 3 prefill steps, the later ones with succ / inter regions
    tokens = {}
    for mode in ("auto", "fp8"):
        groups.clear()
        llm = LLM(folder, attention_dtype=mode, **opts)
        tokens[mode] = llm.generate([prompt], params)[0].outputs[0].token_ids
        assert groups and all(groups) == (mode == "fp8") and any(groups) == (mode == "fp8")
    assert tokens["fp8"] == tokens["auto"]
    assert bool(stored) == (kv_cache_dtype == "fp8")
