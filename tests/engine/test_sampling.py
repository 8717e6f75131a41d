"""The batched sampler against straightforward per-row references, and logprobs against LLM.logits."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.engine import sampler
from qwen1m.engine.sequence import Sequence
from qwen1m.errors import RequestError

VOCAB = 97


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sampling"), seed=23)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint, dtype="float32", device="cpu", max_num_batched_tokens=7)


def seq_of(params: SamplingParams, prompt: list[int], output: list[int], seed: int = 0) -> Sequence:
    gen = None if params.greedy else torch.Generator().manual_seed(seed)
    return Sequence("r", 0, None, prompt + output, len(prompt), params, 1 << 20, generator=gen)


# ---- references, written the plain way -------------------------------------------------------------
def reference_sample(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    """The per-row sampler the batched one replaced (temperature, top-k, top-p, min-p, CPU draw)."""
    if params.greedy:
        return int(torch.argmax(logits))
    raw, logits = logits, logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs = sorted_probs.masked_fill((cumulative - sorted_probs) >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0 or not torch.isfinite(probs).all():
        return int(torch.argmax(raw.masked_fill(~torch.isfinite(raw), float("-inf"))))
    # inverse CDF at one uniform number from the row's generator (the batched sampler's draw)
    cdf = probs.cumsum(0)
    target = float(torch.rand((), generator=generator)) * cdf[-1]
    return min(int(torch.searchsorted(cdf, target[None], right=True)), probs.shape[0] - 1)


def reference_modify(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]):
    """logit_bias, then repetition (prompt + output), frequency and presence (output) penalties."""
    x = logits.clone()
    for token, bias in (params.logit_bias or {}).items():
        x[token] += bias
    for token in set(prompt) | set(output):
        x[token] = x[token] / params.repetition_penalty if x[token] > 0 else x[token] * params.repetition_penalty
    for token in set(output):
        x[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return x


# ---- the sampler -------------------------------------------------------------------------------------
ROWS = [
    dict(temperature=0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=0),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=2.0, min_p=0.3),
    dict(temperature=1.0, top_k=1),
]


def test_batched_draws_equal_the_per_row_sampler_for_the_same_seeds():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(len(ROWS), VOCAB, generator=gen) * 3
        logits[2, :10] = float("-inf")
        if trial % 5 == 0:
            logits[6] = float("nan")  # a broken row falls back to the argmax of its finite logits
            logits[6, 3] = 1.0
        params = [SamplingParams(seed=trial, **kw) for kw in ROWS]
        seqs = [seq_of(p, [1, 2], [], seed=100 * trial + i) for i, p in enumerate(params)]
        got = sampler.sample_batch(logits, seqs)
        want = [reference_sample(logits[i], p, torch.Generator().manual_seed(100 * trial + i))
                for i, p in enumerate(params)]
        assert got == want


TOP_K_ROWS = [  # every sampled row has a top-k: the sampler draws among the top-k candidates only
    dict(temperature=0),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_k=96, top_p=0.8),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=2.0, top_k=60, min_p=0.3),
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.5, top_k=3, seed=None),
]


def test_draws_among_the_top_k_candidates_equal_the_per_row_sampler():
    """The short path (softmax, top-p, min-p and the draw on [rows, max top_k] candidates, put back in
    token order) picks the token the whole-vocabulary reference picks for the same uniform number."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(30):
        logits = torch.randn(len(TOP_K_ROWS), VOCAB, generator=gen) * 3
        logits[2, :10] = float("-inf")
        logits[5, 20:] = float("-inf")  # fewer finite logits than the row's top_k
        if trial % 5 == 0:
            logits[4] = float("nan")  # a broken row falls back to the argmax of its finite logits
            logits[4, 3] = 1.0
        params = [SamplingParams(**{"seed": trial, **kw}) for kw in TOP_K_ROWS]
        seqs = [seq_of(p, [1, 2], [], seed=100 * trial + i) for i, p in enumerate(params)]
        got = sampler.sample_batch(logits, seqs)
        want = [reference_sample(logits[i], p, torch.Generator().manual_seed(100 * trial + i))
                for i, p in enumerate(params)]
        assert got == want, trial


def test_a_row_with_no_finite_logit_fails_alone():
    logits = torch.randn(3, VOCAB)
    logits[1] = float("nan")
    seqs = [seq_of(SamplingParams(temperature=t), [1], []) for t in (0.5, 0.5, 0)]
    out = sampler.sample_batch(logits, seqs)
    assert isinstance(out[1], sampler.SamplingError) and isinstance(out[0], int) and isinstance(out[2], int)


@pytest.mark.parametrize("kw", [
    dict(presence_penalty=0.8),
    dict(frequency_penalty=-0.6),
    dict(repetition_penalty=1.7),
    dict(repetition_penalty=0.6, presence_penalty=-1.0, frequency_penalty=1.5),
    dict(logit_bias={5: 4.0, 6: -100.0, 90: 2.5}),
    dict(logit_bias={3: 1.0}, repetition_penalty=1.3, frequency_penalty=0.4),
])
def test_penalties_and_logit_bias_match_the_reference(kw):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen) * 4
    prompts = [[1, 2, 3, 3], [5, 6], [7], [9, 9, 9]]
    outputs = [[3, 3, 8, 5], [], [7, 7, 40, 41, 40], [90]]
    params = [SamplingParams(temperature=0, **kw) for _ in range(4)]
    seqs = [seq_of(p, prompt, out) for p, prompt, out in zip(params, prompts, outputs)]
    want = torch.stack([reference_modify(logits[i], params[i], prompts[i], outputs[i]) for i in range(4)])
    x = logits.clone()
    sampler._apply_logit_bias(x, params)
    sampler._apply_penalties(x, seqs)
    torch.testing.assert_close(x, want)
    assert sampler.sample_batch(logits, seqs) == want.argmax(-1).tolist()  # greedy rows with modifiers
    # sampled rows: the same draw as the reference sampler on the reference's modified logits
    sampled = [SamplingParams(temperature=0.8, top_k=30, seed=i, **kw) for i in range(4)]
    seqs = [seq_of(p, prompt, out, seed=i) for i, (p, prompt, out) in enumerate(zip(sampled, prompts, outputs))]
    want_tokens = [reference_sample(reference_modify(logits[i], sampled[i], prompts[i], outputs[i]), sampled[i],
                                    torch.Generator().manual_seed(i)) for i in range(4)]
    assert sampler.sample_batch(logits, seqs) == want_tokens


def test_greedy_and_sampled_rows_in_one_batch_equal_each_alone(llm):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [9, 3]]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.5, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=6, temperature=1.2, top_k=10, presence_penalty=1.0, seed=8,
                             ignore_eos=True, logprobs=0)]
    together = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        alone = llm.generate([prompt], p)[0].outputs[0]
        assert out.outputs[0].token_ids == alone.token_ids
        assert out.outputs[0].logprobs == alone.logprobs or _close(out.outputs[0].logprobs, alone.logprobs)


def _close(a, b) -> bool:
    return [list(x) for x in a] == [list(y) for y in b] and all(
        abs(x[t].logprob - y[t].logprob) < 1e-5 for x, y in zip(a, b) for t in x)


# ---- logprobs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.5, top_k=8, seed=2, repetition_penalty=1.4)])
def test_logprobs_are_log_softmax_of_the_raw_logits(llm, kw):
    prompt = [4, 8, 15, 16, 23, 42]
    out = llm.generate([prompt], SamplingParams(max_tokens=5, logprobs=3, ignore_eos=True, **kw))[0].outputs[0]
    logprobs = torch.log_softmax(llm.logits(prompt + out.token_ids[:-1]), -1)[len(prompt) - 1:]
    assert len(out.logprobs) == len(out.token_ids) == 5
    total = 0.0
    for row, token, entry in zip(logprobs, out.token_ids, out.logprobs):
        assert next(iter(entry)) == token  # the chosen token first
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-5)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = torch.topk(row, 3)
        others = {t: v for t, v in entry.items() if entry[t].rank <= 3}
        assert sorted(others) == sorted(top.indices.tolist())
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            assert entry[t].rank == rank and entry[t].logprob == pytest.approx(v, abs=1e-5)
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_prompt_logprobs_are_log_softmax_over_the_prompt(checkpoint, llm):
    prompt = [(7 * i + 3) % VOCAB for i in range(20)]  # prefilled in chunks of 7 tokens
    want = torch.log_softmax(llm.logits(prompt), -1)
    cached = LLM(checkpoint, dtype="float32", device="cpu", max_num_batched_tokens=7, block_size=4,
                 enable_prefix_caching=True)
    # the second cached run could take the prompt's blocks from the cache: asking for prompt logprobs
    # computes every position anyway
    for engine in (llm, cached, cached):
        out = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))[0]
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for p in range(1, len(prompt)):
            entry = out.prompt_logprobs[p]
            assert next(iter(entry)) == prompt[p]
            assert entry[prompt[p]].logprob == pytest.approx(want[p - 1, prompt[p]].item(), abs=1e-5)
            assert {t for t in entry if entry[t].rank <= 2} == set(torch.topk(want[p - 1], 2).indices.tolist())


def test_overlapped_greedy_decode_reports_the_same_logprobs(checkpoint):
    plain = LLM(checkpoint, dtype="float32", device="cpu")
    overlapped = LLM(checkpoint, dtype="float32", device="cpu")
    overlapped.engine.overlap = True
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=k) for k in (None, 0, 4)]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    a, b = plain.generate(prompts, params), overlapped.generate(prompts, params)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert (x.outputs[0].logprobs is None) == (y.outputs[0].logprobs is None)
        if x.outputs[0].logprobs is not None:
            assert _close(x.outputs[0].logprobs, y.outputs[0].logprobs)


# ---- parameters ---------------------------------------------------------------------------------------
def test_sampling_params_take_vllm_names_and_name_bad_fields(llm):
    assert SamplingParams(logprobs=2).logprobs == 2
    assert not SamplingParams(temperature=0, logprobs=5).rewrites_logits  # logprobs keep the fast path
    assert not SamplingParams(temperature=0, presence_penalty=0.5).plain_greedy
    for kw, words in [
        (dict(logprobs=-1), "SamplingParams.logprobs must be"),
        (dict(logprobs=21), "SamplingParams.logprobs must be"),
        (dict(prompt_logprobs=1.5), "SamplingParams.prompt_logprobs must be"),
        (dict(presence_penalty=3), "SamplingParams.presence_penalty must be in [-2, 2]"),
        (dict(frequency_penalty=float("nan")), "SamplingParams.frequency_penalty"),
        (dict(repetition_penalty=0), "SamplingParams.repetition_penalty must be in (0, 100]"),
        (dict(logit_bias={"5": 1.0}), "SamplingParams.logit_bias keys"),
        (dict(logit_bias={5: 101}), "SamplingParams.logit_bias values"),
        (dict(n=2, best_of=3), "SamplingParams.best_of must be None or equal to n=2"),
        (dict(use_beam_search=True), "use_beam_search is not supported"),
    ]:
        with pytest.raises(RequestError) as info:
            SamplingParams(**kw)
        assert words in str(info.value) and str(info.value).count(". ") <= 1, str(info.value)
    assert SamplingParams(n=2, best_of=2).best_of == 2
    with pytest.raises(RequestError, match=r"logit_bias token id 97 is outside the vocabulary \[0, 97\)"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={97: 1.0}))


def test_the_draw_follows_the_distribution_and_never_picks_a_zero_probability_token():
    """4,000 rows of one distribution (a token with probability 0 in the middle and at the end) through
    the batched inverse-CDF draw: frequencies within 0.03 of the probabilities, the zero tokens never."""
    from qwen1m.engine.sampler import _choose

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    rows = 4000
    x = torch.log(probs).expand(rows, -1).clone()
    gen = torch.Generator().manual_seed(0)
    drawn, report = _choose(x, [SamplingParams(temperature=1.0)] * rows, [gen] * rows)
    assert torch.equal(drawn, report)
    counts = torch.bincount(drawn, minlength=5).float() / rows
    assert counts[1] == 0 and counts[4] == 0
    assert (counts - probs).abs().max() < 0.03


def test_the_device_choice_equals_the_host_sampler_and_reports_broken_rows():
    """``sample_on_device`` (no host sync; what lets the engine launch the next step early) gives the
    tokens ``sample_batch`` gives for the same seeds, and -1 for a row with no finite logit."""
    gen = torch.Generator().manual_seed(3)
    rows = ROWS + [dict(temperature=0.6, logit_bias={4: 5.0, 9: -3.0}), dict(temperature=0, logit_bias={7: 50.0})]
    for trial in range(10):
        logits = torch.randn(len(rows), VOCAB, generator=gen) * 3
        logits[1] = float("nan") if trial % 3 == 0 else logits[1]
        params = [SamplingParams(seed=trial, **kw) for kw in rows]
        host = sampler.sample_batch(logits, [seq_of(p, [1], [], seed=10 * trial + i) for i, p in enumerate(params)])
        tokens, report = sampler.sample_on_device(
            logits, [seq_of(p, [1], [], seed=10 * trial + i) for i, p in enumerate(params)])
        assert report.tolist() == [t if isinstance(t, int) else -1 for t in host]
        assert (trial % 3 == 0) == isinstance(host[1], sampler.SamplingError)
        assert tokens.min() >= 0 and host[-1] == 7  # the next step's input is always a valid id
