"""KV blocks as a sequence grows, preemption with recompute, and one request's failure staying its own."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.errors import RequestError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # no DCA: a recomputed key is then bit-for-bit the key first computed (no YaRN temperature)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("preempt"), seed=17, max_position_embeddings=512)


def _per_token(llm: LLM) -> int:
    cfg = llm.config
    return PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                        llm.dtype, llm.engine.kv_cache.fp8)


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]


def test_blocks_grow_with_the_sequence(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=256)
    bs = llm.engine.kv_cache.block_size
    engine = llm.engine
    engine.add_request(list(range(1, 11)), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        if running:
            seq = running[0]
            held.append(len(seq.cache.blocks))
            assert len(seq.cache.blocks) == -(-seq.num_computed_tokens // bs)  # never more than it has written
    assert held[0] == -(-10 // bs)  # its prompt at admission, not 210 tokens' worth
    assert held == sorted(held) and held[-1] == -(-208 // bs)  # 208 computed in its last step before the end
    assert engine.kv_cache_usage() == 0.0


def test_preempted_sequences_are_recomputed_to_the_same_tokens(ckpt):
    """Three requests whose outputs outgrow a small cache: the newest is preempted (blocks freed,
    queued first) and recomputed later; every answer equals the one from a roomy cache."""
    prompts = _prompts([20, 30, 25], seed=4)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    roomy = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=128)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    tight = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=128, max_num_batched_tokens=32,
                kv_cache_memory=160 * _per_token(roomy))
    assert tight.engine.block_pool.num_blocks * tight.engine.kv_cache.block_size == 160  # < 3 x 85 tokens
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.engine.kv_cache_usage() == 0.0 and not tight.engine.scheduler.has_unfinished()

    # sampled with seeds: the recomputed sequence continues its own random stream
    seeded = SamplingParams(n=2, max_tokens=60, temperature=0.8, seed=9, ignore_eos=True)
    expected = [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, seeded)]
    before = tight.engine.scheduler.num_preemptions
    got = [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, seeded)]
    assert tight.engine.scheduler.num_preemptions > before and got == expected


def test_a_small_request_is_not_stuck_behind_a_large_one(ckpt):
    """n=6 completions that may each run to max_model_len do not fit the cache together; a 4-token
    request that arrives after them finishes while they still run (whole-length reservation kept it
    waiting until they had all ended)."""
    roomy = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=256)
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=256,
              kv_cache_memory=4 * 256 * _per_token(roomy))
    engine = llm.engine
    assert engine.block_pool.num_blocks * engine.kv_cache.block_size < 6 * 256
    big = engine.add_request(list(range(1, 9)), SamplingParams(n=6, max_tokens=None, temperature=0,
                                                               ignore_eos=True))
    engine.step()
    small = engine.add_request(list(range(20, 25)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    steps = 0
    while True:
        finished = {o.request_id for o in engine.step() if o.finished}
        steps += 1
        assert big not in finished
        if small in finished:
            break
    assert steps <= 6  # its prefill step and three decodes, give or take a step of the big one
    engine.abort_request(big)
    assert engine.kv_cache_usage() == 0.0


def test_a_request_that_can_never_fit_fails_alone(ckpt):
    roomy = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=128)
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=64,
              kv_cache_memory=64 * _per_token(roomy))
    llm.engine.max_model_len = 128  # as if the memory plan had let it through: the scheduler still copes
    outs = llm.generate([[i % 90 + 1 for i in range(99)], list(range(1, 6))],
                        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "error"
    assert "cannot hold 99 tokens" in outs[0].error
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 4


def test_seeds_are_unsigned_64_bit_for_every_choice(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=128)
    for seed, n in ((2**64 - 1, 2), (2**64, 1), (-1, 1), (10**400, 1)):
        with pytest.raises(RequestError, match=r"seed must be in \[0, 2\*\*64 - n\]") as info:
            llm.generate([[1, 2]], SamplingParams(n=n, seed=seed, max_tokens=2))
        assert len(str(info.value)) < 200  # a 400-digit seed is not echoed whole
    outs = llm.generate([[1, 2]], SamplingParams(n=2, seed=2**64 - 2, max_tokens=2, temperature=1.0))
    assert [len(c.token_ids) for c in outs[0].outputs] == [2, 2]


def test_tiny_temperature_and_a_failing_row_do_not_fail_the_batch(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=128)
    tiny = SamplingParams(max_tokens=6, temperature=1e-300, ignore_eos=True)
    assert tiny.temperature == 0.01  # vLLM's floor: 1e-300 divided the logits into inf
    assert len(llm.generate([[5, 6, 7]], tiny)[0].outputs[0].token_ids) == 6

    def all_nan(output_ids, logits):  # a broken model's row, for one sequence of the batch
        return torch.full_like(logits, float("nan"))

    outs = llm.generate([[5, 6, 7], [8, 9]], [SamplingParams(max_tokens=6, temperature=0.7, seed=13,
                                                             logits_processors=[all_nan]),
                                              SamplingParams(max_tokens=6, temperature=0.7, seed=14,
                                                             ignore_eos=True)])
    assert outs[0].outputs[0].finish_reason == "error" and "no finite logit" in outs[0].error
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 6
    assert llm.engine.kv_cache_usage() == 0.0


def test_a_short_prompt_overtakes_one_that_does_not_fit_yet(ckpt):
    """A 90-token prompt that does not fit beside a running 100-token one waits; a 5-token request
    queued behind it starts (and ends) first; the long prompt starts once blocks are free."""
    roomy = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=128)
    llm = LLM(ckpt, dtype="float32", device="cpu", block_size=8, max_model_len=128,
              kv_cache_memory=160 * _per_token(roomy))
    engine = llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    running = engine.add_request([i % 90 + 1 for i in range(100)], params)
    engine.step()
    blocked = engine.add_request([i % 80 + 2 for i in range(90)], params)
    small = engine.add_request([3, 4, 5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == [small, running, blocked]
    assert engine.requests == {} and engine.kv_cache_usage() == 0.0
