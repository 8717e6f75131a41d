"""Memory planning, queueing on a full KV cache, FP8 KV cache accuracy, fragmented blocks."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.errors import ConfigError, RequestError

DCA = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("mem"), seed=31, max_position_embeddings=512,
                                extra_config={"dual_chunk_attention_config": DCA})


def _per_token(llm):
    cfg = llm.config
    return PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                        llm.dtype, llm.engine.kv_cache.fp8)


def test_plan_reports_what_fits(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", kv_cache_memory=1 << 20)
    plan = llm.memory_plan
    assert plan.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * fp32
    assert plan.max_tokens == (1 << 20) // plan.kv_bytes_per_token // plan.block_size * plan.block_size
    assert f"{plan.max_tokens:,} tokens fit" in str(plan)
    assert llm.engine.block_pool.num_blocks == plan.num_blocks


def test_explicit_max_model_len_that_cannot_fit_is_refused(ckpt):
    with pytest.raises(ConfigError) as err:
        LLM(ckpt, dtype="float32", device="cpu", max_model_len=512, kv_cache_memory=64 * 1024)
    msg = str(err.value)
    assert "max_model_len=512 tokens needs" in msg and "only 128 tokens" in msg
    assert "kv_cache_dtype='fp8'" in msg and "more GPUs" in msg


def test_default_max_model_len_is_lowered_to_what_fits(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", kv_cache_memory=64 * 1024)
    assert llm.engine.max_model_len == 128
    with pytest.raises(RequestError, match="the prompt has 200 tokens but max_model_len is 128"):
        llm.generate([list(range(1, 97)) * 2 + [1] * 8], SamplingParams(max_tokens=1))
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4  # the engine kept serving


def test_block_size_must_divide_dca_chunk_len(ckpt):
    with pytest.raises(ConfigError, match="chunk_size - local_size = 24 is not a multiple of block_size=16"):
        LLM(ckpt, dtype="float32", device="cpu", block_size=16)
    assert LLM(ckpt, dtype="float32", device="cpu").engine.kv_cache.block_size == 8


def test_requests_queue_when_the_cache_is_full(ckpt):
    prompts = [list(range(1, 60)), list(range(5, 70)), list(range(9, 50))]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    roomy = LLM(ckpt, dtype="float32", device="cpu")
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    per_token = _per_token(roomy)
    tight = LLM(ckpt, dtype="float32", device="cpu", kv_cache_memory=80 * per_token, max_model_len=80)
    assert tight.engine.block_pool.num_blocks * 8 == 80  # room for one request at a time
    outs = tight.generate(prompts, params, stream=True)
    seen_running = []
    got = {}
    for out in outs:
        seen_running.append(tight.engine.num_running())
        if out.finished:
            got[out.request_id] = out.outputs[0].token_ids
    assert max(seen_running) == 1
    assert list(got.values()) == expected
    assert tight.engine.kv_cache_usage() == 0.0


def test_fragmented_blocks_give_the_same_logits(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", max_num_batched_tokens=16)
    ids = list(range(3, 90))
    ref = llm.logits(ids)
    pool = llm.engine.block_pool
    held = [pool.allocate(1) for _ in range(pool.num_free)]
    for b in held[::2]:  # free every other block: the next sequence gets a scattered block table
        pool.free(b)
    frag = llm.logits(ids)
    assert torch.equal(frag, ref)


def test_fp8_kv_cache_close_to_full_precision(ckpt):
    ids = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(7)).tolist()
    ref_llm = LLM(ckpt, dtype="float32", device="cpu")
    fp8_llm = LLM(ckpt, dtype="float32", device="cpu", kv_cache_dtype="fp8")
    assert _per_token(fp8_llm) == 2 * 2 * 2 * 16 * 1 + 2 * 2 * 2 * 4  # one byte per value + fp32 scale per head
    ref, ours = ref_llm.logits(ids), fp8_llm.logits(ids)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05  # stated tolerance: 5% of the logit scale on this random tiny model
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    a = ref_llm.generate([ids[:40]], params)[0].outputs[0].token_ids
    b = fp8_llm.generate([ids[:40]], params)[0].outputs[0].token_ids
    assert sum(x == y for x, y in zip(a, b)) >= 12  # greedy tokens mostly equal


def test_progress_reports_prefill(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", max_num_batched_tokens=20)
    seen = []
    llm.generate([list(range(1, 91))], SamplingParams(max_tokens=2, temperature=0), progress=seen.append)
    assert [p.done for p in seen] == [20, 40, 60, 80, 90]
    assert all(p.total == 90 for p in seen) and seen[-1].finished and seen[0].eta_s is not None
