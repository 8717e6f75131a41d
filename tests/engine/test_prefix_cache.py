"""Prefix caching: a later prompt that starts like an earlier one starts from its cached KV blocks.

Every engine test compares with the same engine without prefix caching (float32, CPU): the outputs
and the keys / values of the whole prompt must agree, while the reused token counts show the cache
was used (so a test cannot pass by never reusing)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.cache.block_pool import BlockPool
from qwen1m.cache.prefix_cache import PrefixCache

DCA = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 16}  # blocks of 4 tokens


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("prefix_dense"), seed=31)


@pytest.fixture(scope="module")
def dca_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("prefix_dca"), seed=32,
                                extra_config={"dual_chunk_attention_config": DCA})


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(ckpt, caching: bool, **kw) -> LLM:
    kw.setdefault("max_num_batched_tokens", 48)
    kw.setdefault("block_size", 4)  # the DCA checkpoint's block size too (chunk_len 12)
    return LLM(ckpt, dtype="float32", device="cpu", enable_prefix_caching=caching, **kw)


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)


def _prompt_kv(llm: LLM, ids: list[int]):
    """Prefill ``ids`` through the engine and return every layer's keys and values of the prompt
    (then abort the request) and the number of tokens it took from the prefix cache."""
    engine = llm.engine
    rid = engine.add_request(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    seq = engine.requests[rid][0]
    kv, cached = None, None
    while seq.num_computed_tokens < len(ids):
        if cached is None and seq.cache is not None:
            cached = seq.num_cached_tokens
        engine.step()
        if seq.is_finished:
            break
    cached = seq.num_cached_tokens if cached is None else cached
    if seq.cache is not None:
        kv = [tuple(t.clone() for t in seq.cache.view(layer, len(ids)))
              for layer in range(llm.config.num_hidden_layers)]
    engine.abort_request(rid)
    return kv, cached


def _same_kv(a, b) -> bool:
    return all(torch.allclose(x, y, atol=1e-5, rtol=1e-5) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_keys_name_the_whole_prefix():
    cache = PrefixCache(block_size=4)
    a = cache.keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 2)
    b = cache.keys([9, 2, 3, 4, 5, 6, 7, 8], 2)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, different first
    assert cache.keys([1, 2, 3, 4, 5, 6, 7, 8], 2) == a and cache.keys([1, 2, 3, 4], 1) == a[:1]


def test_match_register_release_evict():
    cache = PrefixCache(block_size=4, scale_tolerance=1e-3)
    keys = cache.keys(list(range(12)), 3)
    assert cache.match(keys, 1.0) == []
    for block, key in zip([10, 11, 12], keys):
        assert cache.register(block, key, 1.0)
    assert not cache.register(20, keys[0], 1.0)  # the prefix is held by block 10 already
    assert cache.match(keys, 1.0005) == [10, 11, 12]  # within tolerance; now used twice
    assert cache.match(keys, 1.01) == []  # another key scale: not reused
    assert cache.match(keys[:1] + cache.keys(list(range(4)) + [99] * 8, 3)[1:], 1.0) == [10]
    assert cache.release([10, 11, 12, 13]) == [13]  # 13 is private
    assert cache.num_idle == 0  # 10-12 still used by the first match
    assert cache.release([10]) == [] and cache.num_idle == 0  # 10 was matched a third time above
    assert cache.release([10, 11, 12]) == [] and cache.num_idle == 3
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release([11])
    assert cache.is_idle(12) and not cache.is_idle(13)
    assert cache.evict(2) == [12, 11]  # the tail of the prefix first
    assert cache.match(keys, 1.0) == [10] and cache.num_idle == 0 and cache.evict(5) == []


def test_block_pool_allocate_run():
    pool = BlockPool(10)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate_run(5, 3) == [5, 6, 7]
    assert pool.allocate_run(4, 2) is None and pool.allocate_run(8, 3) is None and pool.allocate_run(3, 0) == []
    assert pool.count_free(0, 10) == 4 and pool.count_free(8, 10) == 2
    assert pool.allocate_run(3, 2) == [3, 4] and pool.num_free == 2 and pool.count_free(0, 8) == 0


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_second_question_reuses_the_document(dense_ckpt, params):
    doc = _ids(70, 1)
    questions = [_ids(5, 2), _ids(9, 3), _ids(3, 4)]  # prompts of different lengths: m = 1 without DCA
    plain, cached = _llm(dense_ckpt, False), _llm(dense_ckpt, True)
    want = [plain.generate([doc + q], params)[0] for q in questions]
    got = [cached.generate([doc + q], params)[0] for q in questions]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.num_cached_tokens for o in want] == [0, 0, 0]
    assert [o.num_cached_tokens for o in got] == [0, 68, 68]  # the document's 17 full blocks of 4


def test_reused_prompt_has_the_same_keys_and_values(dense_ckpt):
    doc = _ids(61, 5)
    plain, cached = _llm(dense_ckpt, False), _llm(dense_ckpt, True)
    _prompt_kv(cached, doc + _ids(7, 6))
    want, _ = _prompt_kv(plain, doc + _ids(11, 7))
    got, n = _prompt_kv(cached, doc + _ids(11, 7))
    assert n == 60 and _same_kv(got, want)
    # the whole prompt again: everything but its last token's block is reused
    got, n = _prompt_kv(cached, doc + _ids(11, 7))
    assert n == 68 and _same_kv(got, want)


def test_dca_reuses_only_at_the_same_yarn_scale(dca_ckpt):
    """DCA writes keys times m(prompt length) (original length 16 here, so m > 1 and grows): a
    float32 cache reuses a block only for a prompt of the same length."""
    doc = _ids(50, 8)
    plain, cached = _llm(dca_ckpt, False), _llm(dca_ckpt, True)
    cached.generate([doc + _ids(4, 9)], GREEDY)
    for q, expect in [(_ids(4, 10), 48), (_ids(6, 11), 0)]:
        want = plain.generate([doc + q], GREEDY)[0]
        got = cached.generate([doc + q], GREEDY)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids and got.num_cached_tokens == expect
    want, _ = _prompt_kv(plain, doc + _ids(4, 12))
    got, n = _prompt_kv(cached, doc + _ids(4, 12))
    assert n == 48 and _same_kv(got, want)


def test_a_running_sequence_shares_its_prefix(dense_ckpt):
    """B arrives while A, which computed the document, still decodes: B reuses A's blocks; A's end
    does not free them under B."""
    doc, qa, qb = _ids(40, 13), _ids(3, 14), _ids(6, 15)
    plain = _llm(dense_ckpt, False)
    long, short = (SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (12, 5))
    want = [o.outputs[0].token_ids for o in plain.generate([doc + qa, doc + qb], [long, short])]
    llm = _llm(dense_ckpt, True)
    engine = llm.engine
    ra = engine.add_request(doc + qa, long)
    seq_a = engine.requests[ra][0]
    while seq_a.num_computed_tokens < seq_a.num_prompt_tokens:
        engine.step()
    rb = engine.add_request(doc + qb, short)
    seq_b = engine.requests[rb][0]
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert outs[rb].num_cached_tokens == 40 and seq_b.cache is None and seq_a.cache is None
    assert [outs[ra].outputs[0].token_ids, outs[rb].outputs[0].token_ids] == want
    pool, prefix = engine.block_pool, engine.prefix_cache
    assert prefix.num_idle == prefix.num_registered > 0
    assert pool.num_free + prefix.num_idle == pool.num_blocks and engine.kv_cache_usage() == 0.0


def test_questions_in_one_call_share_the_document(dense_ckpt):
    """Three questions in one generate call are admitted together; the second and third find the
    document's blocks the first has computed by the time their first chunk is due."""
    doc = _ids(150, 24)
    prompts = [doc + _ids(k, 25 + k) for k in (3, 5, 7)]
    plain, cached = _llm(dense_ckpt, False), _llm(dense_ckpt, True)
    want = plain.generate(prompts, GREEDY)
    got = cached.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # 48 tokens a step: the first prompt's chunks end at 48, 96, 144, 153; the other two get their
    # first tokens in the fourth step (the budget left after the first's last 9), when 144 tokens
    # (36 blocks) of the document are computed and registered
    assert [o.num_cached_tokens for o in got] == [0, 144, 144]
    engine = cached.engine
    assert engine.block_pool.num_free + engine.prefix_cache.num_idle == engine.block_pool.num_blocks


def test_after_the_first_request_the_blocks_stay_contiguous(dense_ckpt):
    doc = _ids(64, 16)
    llm = _llm(dense_ckpt, True)
    llm.generate([doc + _ids(5, 17)], GREEDY)
    engine = llm.engine
    rid = engine.add_request(doc + _ids(8, 18), GREEDY)
    engine.step()
    seq = engine.requests[rid][0]
    assert seq.num_cached_tokens == 64 and seq.cache.first_block is not None  # one strided view, no gather
    engine.abort_request(rid)


def test_idle_blocks_are_evicted_when_the_pool_is_short(dense_ckpt):
    """A pool that holds one long sequence: another long prompt takes the document's idle blocks; the
    document asked again is computed again, with the same result."""
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x float32 bytes
    doc, other = _ids(90, 19), _ids(96, 20)
    plain = _llm(dense_ckpt, False)
    llm = _llm(dense_ckpt, True, kv_cache_memory=112 * per_token, max_model_len=110)
    assert llm.engine.block_pool.num_blocks * 4 < 2 * 100  # at most one 100-token sequence fits
    first = llm.generate([doc + _ids(3, 21)], GREEDY)[0]
    assert llm.engine.prefix_cache.num_idle > 0
    mid = llm.generate([other], GREEDY)[0]
    again = llm.generate([doc + _ids(3, 22)], GREEDY)[0]
    want = [plain.generate([p], GREEDY)[0].outputs[0].token_ids for p in (doc + _ids(3, 21), other, doc + _ids(3, 22))]
    assert [first.outputs[0].token_ids, mid.outputs[0].token_ids, again.outputs[0].token_ids] == want
    # the document's blocks went from the tail: only its first two blocks were left to reuse
    assert mid.num_cached_tokens == 0 and again.num_cached_tokens == 8


def test_prompt_logits_are_unaffected(dense_ckpt):
    doc = _ids(30, 23)
    plain, cached = _llm(dense_ckpt, False), _llm(dense_ckpt, True)
    cached.generate([doc], GREEDY)
    assert torch.allclose(cached.logits(doc + [1, 2]), plain.logits(doc + [1, 2]), atol=1e-5)


def test_fp8_cache_reuses_the_same_quantised_blocks(dca_ckpt):
    """An FP8 cache stores per-token scales with each block: reused blocks are the bytes a
    recomputation would write, so the outputs match the FP8 engine without prefix caching."""
    doc = _ids(60, 26)
    plain, cached = _llm(dca_ckpt, False, kv_cache_dtype="fp8"), _llm(dca_ckpt, True, kv_cache_dtype="fp8")
    assert cached.engine.prefix_cache.scale_tolerance > 0  # FP8: the low-precision tolerance
    cached.generate([doc + _ids(4, 27)], GREEDY)
    want = plain.generate([doc + _ids(4, 28)], GREEDY)[0]
    got = cached.generate([doc + _ids(4, 28)], GREEDY)[0]
    assert got.num_cached_tokens == 60 and got.outputs[0].token_ids == want.outputs[0].token_ids
