"""JSON mode on real models: sampled at temperature 1, any seed, any max_tokens from the minimum
up, the output always parses as one JSON object. Also the processor's per-step cost (printed, run
with -s to see it; no timing asserts)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from live_server import text_checkpoint

from qwen1m import LLM, SamplingParams
from qwen1m.constrained import MIN_MAX_TOKENS, json_object_processor
from qwen1m.errors import RequestError
from qwen1m.tokenizer import Tokenizer

BUNDLED = Path(__file__).parents[2] / "src" / "qwen1m" / "bundled"
# a folder with a 152K-token Qwen tokenizer.json, when the machine has one (the cost test's second row)
LARGE_TOKENIZER = os.environ.get("QWEN1M_TOKENIZER_152K")
PROMPT = "Describe Paris as a JSON object: "


@pytest.fixture(scope="module")
def bundled():
    return LLM(max_model_len=512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return LLM(text_checkpoint(tmp_path_factory.mktemp("json_tiny")), dtype="float32", device="cpu",
               max_model_len=512)


def json_outputs(llm: LLM, max_tokens: int, seed: int, n: int = 2):
    proc = json_object_processor(llm.tokenizer, max_tokens)
    params = SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, logits_processors=[proc])
    return llm.generate([PROMPT], params)[0].outputs


@pytest.mark.parametrize("model", ["bundled", "tiny"])
@pytest.mark.parametrize("max_tokens", [MIN_MAX_TOKENS, 3, 7, 60])
def test_json_mode_output_always_parses(request, model, max_tokens):
    llm = request.getfixturevalue(model)
    lengths = set()
    for seed in range(3):
        for out in json_outputs(llm, max_tokens, seed):
            assert isinstance(json.loads(out.text), dict), out.text
            assert len(out.token_ids) <= max_tokens
            lengths.add(len(out.token_ids))
    if max_tokens == 60:  # sampling does wander: not every completion is the shortest object
        assert max(lengths) > 2


def test_json_mode_ends_with_eos_once_complete(tiny):
    # with room to spare, a finished object is followed by EOS (finish "stop"), never by more text
    eos = set(tiny.tokenizer.eos_token_ids)
    for seed in range(3):
        for out in json_outputs(tiny, 200, seed):
            json.loads(out.text)
            assert out.finish_reason == "stop" or len(out.token_ids) == 200
            assert not eos & set(out.token_ids[:-1])


def test_small_max_tokens_is_refused():
    tok = Tokenizer.from_folder(BUNDLED)
    with pytest.raises(RequestError, match=f"max_tokens of at least {MIN_MAX_TOKENS}.*got 1"):
        json_object_processor(tok, 1)
