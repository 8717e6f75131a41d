"""One LLM shared by threads (no hang, the single-threaded tokens), and no request outlives its call:
a batch with a bad prompt queues nothing, a stream dropped or never started aborts its requests."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.errors import RequestError

HANG_GUARD_S = 300  # generous: a deadlock shows as a thread still alive after this, not as slowness


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("shared"), seed=21)
    return LLM(folder, dtype="float32", device="cpu", max_model_len=128)


def _idle(llm: LLM) -> bool:
    engine = llm.engine
    return not engine.has_unfinished_requests() and not engine.requests


def _prompts(seed: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(3, 30, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def test_four_threads_share_one_llm(llm):
    params = [SamplingParams(max_tokens=6 + t, temperature=0, ignore_eos=True) for t in range(4)]
    prompts = [_prompts(100 + t, 4) for t in range(4)]
    expected = [[o.outputs[0].token_ids for o in llm.generate(prompts[t], params[t])] for t in range(4)]
    results: dict[int, object] = {}
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()  # all four enter generate together
        try:
            results[t] = [o.outputs[0].token_ids for o in llm.generate(prompts[t], params[t])]
        except BaseException as e:  # reported by the assertion below
            results[t] = e

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(HANG_GUARD_S)
    assert not any(th.is_alive() for th in threads), "a generate call hung"
    assert [results[t] for t in range(4)] == expected
    assert _idle(llm)


def test_a_stream_and_a_generate_in_two_threads(llm):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a, b = _prompts(7, 2), _prompts(8, 3)
    want_a = [o.outputs[0].token_ids for o in llm.generate(a, params)]
    want_b = [o.outputs[0].token_ids for o in llm.generate(b, params)]
    stream = llm.generate(a, params, stream=True)
    first = next(stream)  # this thread has stepped the engine once
    other: dict[str, object] = {}
    thread = threading.Thread(target=lambda: other.update(out=llm.generate(b, params)), daemon=True)
    thread.start()
    finished = {o.request_id: o for o in [first, *stream] if o.finished}
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive()
    assert [finished[rid].outputs[0].token_ids for rid in stream.request_ids] == want_a
    assert [o.outputs[0].token_ids for o in other["out"]] == want_b
    assert _idle(llm)


def test_a_bad_prompt_queues_none_of_the_batch(llm):
    with pytest.raises(RequestError, match=r"^prompt 2: token id 500 is outside the vocabulary \[0, 97\)\.$"):
        llm.generate([[1, 2, 3], [4, 5], [6, 500]], SamplingParams(max_tokens=3))
    assert _idle(llm)
    with pytest.raises(RequestError, match=r"^prompt 1: the prompt has 200 tokens but max_model_len is 128"):
        llm.generate([[1, 2, 3], [1] * 200], SamplingParams(max_tokens=3))
    assert _idle(llm)
    with pytest.raises(RequestError, match=r"^sampling_params\[1\] is a dict, not a SamplingParams\.$"):
        llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=3), {"max_tokens": 3}])
    assert _idle(llm)


@pytest.mark.parametrize("how", ["never_started", "dropped_after_one", "closed"])
def test_an_unfinished_stream_aborts_its_requests(llm, how):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = llm.generate([[9, 8, 7]], params)[0]
    stream = llm.generate(_prompts(3, 3), params, stream=True)
    if how != "never_started":
        assert not next(stream).finished
    if how == "closed":
        stream.close()
        assert list(stream) == []  # a closed stream ends
    del stream
    gc.collect()
    assert _idle(llm)
    # the next call computes only its own request, with the same result as before
    again = llm.generate([[9, 8, 7]], params)
    assert len(again) == 1 and again[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert _idle(llm)


def test_a_stream_dropped_while_the_engine_is_busy_aborts_later(llm):
    """A stream collected during a step (the engine's lock held, here by this thread) cannot abort
    then; its requests go at the start of the engine's next use, before anything is computed."""
    stream = llm.generate(_prompts(4, 2), SamplingParams(max_tokens=5), stream=True)
    with llm._shared.locked():
        stream.close()
        assert llm.engine.has_unfinished_requests()
    with llm._shared.locked():
        pass
    assert _idle(llm)
