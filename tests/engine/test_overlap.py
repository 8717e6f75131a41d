"""Overlapped decode (LLMEngine.overlap): the next step is launched before this step's tokens reach
the host, fed by the device argmax. On the CPU nothing overlaps in time, but the bookkeeping is the
same code as on the GPU: placeholders, rows dropped for sequences that stop, aborts between steps,
requests arriving while a step is in flight. Every test compares with the engine stepping plainly."""

from __future__ import annotations

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams

DCA = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("overlap"), seed=21,
                                extra_config={"dual_chunk_attention_config": DCA})


def make_llm(checkpoint, overlap: bool) -> LLM:
    llm = LLM(checkpoint, dtype="float32", device="cpu", max_num_batched_tokens=32)
    llm.engine.overlap = overlap
    return llm


def prompts(n: int, seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(k),), generator=gen).tolist() for k in torch.randint(2, 30, (n,), generator=gen)]


def summary(outputs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outputs]


def count_aheads(llm) -> list[int]:
    """Wrap launch_ahead to count the steps it launched early (so a test cannot pass by never overlapping)."""
    launched = [0]
    inner = llm.engine.runner.launch_ahead

    def counting(step, scheduler):
        ahead = inner(step, scheduler)
        launched[0] += ahead is not None
        return ahead
    llm.engine.runner.launch_ahead = counting
    return launched


def test_overlapped_generate_equals_plain_with_stops_and_lengths(checkpoint):
    ps = prompts(6)
    plain = make_llm(checkpoint, overlap=False)
    free = plain.generate(ps, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    # stop tokens taken from the free run, so that sequences end at different steps, by stop token
    # and by length, while the others keep decoding
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, stop_token_ids=stop)
              for m, stop in [(12, [free[0].outputs[0].token_ids[2]]), (5, None), (12, None),
                              (12, [free[3].outputs[0].token_ids[6]]), (1, None), (9, None)]]
    want = summary(plain.generate(ps, params))
    llm = make_llm(checkpoint, overlap=True)
    aheads = count_aheads(llm)
    got = summary(llm.generate(ps, params))
    assert got == want
    assert aheads[0] >= 5, "the overlapped path was not taken"
    assert any(reason == "stop" for _, reason, _ in got) and any(reason == "length" for _, reason, _ in got)
    # after the run the engine may hold a step launched for sequences that have all finished: the
    # next run must not return its tokens
    again = summary(llm.generate(ps[:2], params[:2]))
    assert again == want[:2]


def test_aborts_and_arrivals_between_steps(checkpoint):
    """Drive the engine step by step: a request arrives while a step is in flight, another is
    aborted after its step was launched early. Final tokens equal the plain engine's."""
    ps = prompts(4, seed=8)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    def run(overlap: bool):
        llm = make_llm(checkpoint, overlap)
        aheads = count_aheads(llm)
        eng = llm.engine
        done, seen = {}, {}
        ids = [eng.add_request(ps[i], params) for i in range(3)]
        for step in range(40):
            if step == 4:
                ids.append(eng.add_request(ps[3], params))  # arrives mid-run
            if step == 6:
                eng.abort_request(ids[1])
                done[ids[1]] = "aborted"
            for out in eng.step():
                seen[out.request_id] = list(out.outputs[0].token_ids)
                assert all(t >= 0 for t in out.outputs[0].token_ids), "a placeholder leaked into an output"
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
            if not eng.has_unfinished_requests():
                break
        return done, seen, aheads[0]

    plain_done, plain_seen, _ = run(False)
    done, seen, aheads = run(True)
    assert aheads > 0
    assert done == plain_done
    assert seen[list(seen)[1]] == plain_seen[list(plain_seen)[1]]  # tokens the aborted one got before its abort
    assert len(done) == 4 and all(len(v) == 10 for k, v in done.items() if v != "aborted")


def test_sampled_rows_overlap_and_stay_seeded(checkpoint):
    """Sampled rows (temperature, top-k, top-p, min-p, logit_bias) are chosen on the device, so their
    steps are launched early too, with the tokens of the plain engine for the same seeds."""
    ps = prompts(4, seed=9)
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=1.2, top_k=8, top_p=0.9, seed=4, ignore_eos=True,
                             logit_bias={5: 3.0}),
              SamplingParams(max_tokens=6, temperature=0.7, min_p=0.1, seed=5, ignore_eos=True)]
    want = summary(make_llm(checkpoint, overlap=False).generate(ps, params))
    assert len({tuple(t) for t, _, _ in want}) == 4
    llm = make_llm(checkpoint, overlap=True)
    aheads = count_aheads(llm)
    assert summary(llm.generate(ps, params)) == want
    assert aheads[0] >= 4, "the overlapped path was not taken"


@pytest.mark.parametrize("extra", [dict(repetition_penalty=1.3), dict(logits_processors=[lambda ids, row: row])])
def test_penalties_and_logits_processors_disable_overlap_and_stay_seeded(checkpoint, extra):
    """Penalties count the output tokens and a logits processor reads them on the host: such a step
    samples there, after its tokens arrive, and is never launched early."""
    ps = prompts(3, seed=9)
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, **extra),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    want = summary(make_llm(checkpoint, overlap=False).generate(ps, params))
    llm = make_llm(checkpoint, overlap=True)
    aheads = count_aheads(llm)
    assert summary(llm.generate(ps, params)) == want
    assert aheads[0] == 0


def test_streaming_progress_sees_every_prefill_chunk(checkpoint):
    """prefill_progress after a step reports that step's prompt chunks, also when the step after it
    was launched early (its own prefilled list is empty)."""
    llm = make_llm(checkpoint, overlap=True)
    eng = llm.engine
    prompt = (prompts(1, seed=2)[0] * 40)[:70]  # chunks of 32, 32 and 6 tokens
    aheads = count_aheads(llm)
    eng.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    reports = []
    while eng.has_unfinished_requests():
        eng.step()
        reports.extend((p.done, p.total) for p in eng.prefill_progress())
    assert reports == [(32, 70), (64, 70), (70, 70)]
    assert aheads[0] > 0


def test_a_failed_early_launch_leaves_no_placeholder(checkpoint):
    """If the forward of an early-launched step raises (e.g. out of memory), the error reaches the
    caller, the sequences hold only real tokens, and the engine steps on once the cause is gone."""
    ps = prompts(2, seed=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = summary(make_llm(checkpoint, overlap=False).generate(ps, params))
    llm = make_llm(checkpoint, overlap=True)
    eng = llm.engine
    for p in ps:
        eng.add_request(p, params)
    eng.step()  # prefill of both (their first tokens) and an early launch of the next step
    inner, calls = eng.runner.run, [0]

    def failing(scheduled, device_ids=None):
        if device_ids is not None:
            calls[0] += 1
            raise RuntimeError("simulated failure")
        return inner(scheduled, device_ids)
    eng.runner.run = failing
    with pytest.raises(RuntimeError, match="simulated"):
        eng.step()
    assert calls[0] == 1
    for seqs in eng.requests.values():
        assert all(t >= 0 for seq in seqs for t in seq.token_ids)
    eng.runner.run = inner
    done = {}
    for _ in range(50):  # bounded: a lost token would leave a sequence never scheduled again
        for out in eng.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason, None)
        if not eng.has_unfinished_requests():
            break
    assert not eng.has_unfinished_requests(), "a sequence stopped being scheduled after the failure"
    assert [done[k] for k in sorted(done)] == [tuple(w) for w in want]
