"""Request errors from the engine: a max_tokens that does not fit is refused (never trimmed), and
every error names its request, or no request at all, never an empty one."""

from __future__ import annotations

import re

import pytest

from qwen1m import LLM, SamplingParams
from qwen1m.errors import RequestError

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from checkpoints import save_tiny_checkpoint

    return LLM(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), dtype="float32", device="cpu",
               max_model_len=MAX_MODEL_LEN)


def test_max_tokens_that_does_not_fit_is_a_request_error_naming_both_numbers(llm):
    prompt = [5] * 12
    with pytest.raises(RequestError) as e:
        llm.generate([prompt], SamplingParams(max_tokens=200000))
    message = str(e.value)
    assert re.fullmatch(rf"Request \S+: max_tokens=200000 and the prompt's 12 tokens exceed "
                        rf"max_model_len={MAX_MODEL_LEN} \(at most {MAX_MODEL_LEN - 12} new tokens fit\)\.", message)
    # exactly the room fits, and is generated in full (ignore_eos): nothing is trimmed
    out = llm.generate([prompt], SamplingParams(max_tokens=MAX_MODEL_LEN - 12, ignore_eos=True, temperature=0))
    assert len(out[0].outputs[0].token_ids) == MAX_MODEL_LEN - 12
    # None still means "all the room there is"
    out = llm.generate([prompt], SamplingParams(max_tokens=None, ignore_eos=True, temperature=0))
    assert len(out[0].outputs[0].token_ids) == MAX_MODEL_LEN - 12


def test_engine_errors_name_the_request_id(llm):
    with pytest.raises(RequestError, match=r"^Request r-7: the prompt is empty\.$"):
        llm.engine.add_request([], SamplingParams(), "r-7")
    with pytest.raises(RequestError, match=r"^Request r-8: max_tokens=99 "):
        llm.engine.add_request([1, 2], SamplingParams(max_tokens=99), "r-8")


def test_errors_without_a_request_name_none(llm):
    # LLM.logits scores a prompt outside any request: "Request : ..." named an empty id
    with pytest.raises(RequestError, match=r"^The prompt is empty\.$"):
        llm.logits([])
    with pytest.raises(RequestError, match=r"^The prompt has 64 tokens but max_model_len is 64"):
        llm.logits([1] * MAX_MODEL_LEN)
