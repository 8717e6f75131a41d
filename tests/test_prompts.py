"""Every wrong prompt is a RequestError naming the prompt's index and what was wrong, and queues nothing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from checkpoints import save_tiny_checkpoint
from tokenizer_utils import make_tokenizer_folder

from qwen1m import LLM, SamplingParams
from qwen1m.errors import ConfigError, RequestError

CHATML = (Path(__file__).parent / "fixtures" / "chatml_template.jinja").read_text()
PARAMS = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    make_tokenizer_folder(folder, CHATML)
    from qwen1m.tokenizer import Tokenizer

    save_tiny_checkpoint(folder, seed=31, vocab_size=Tokenizer.from_folder(folder).vocab_size)
    return LLM(folder, dtype="float32", device="cpu", max_model_len=64)


@pytest.mark.parametrize(("prompts", "message"), [
    ([5, "a"], "prompt 0: item 1 is 'a' (a str), not an integer token id."),
    ([True], "prompt 0: item 0 is True (a bool), not an integer token id."),
    ([[1, 2], [3, None]], "prompt 1: item 1 is None (a NoneType), not an integer token id."),
    ([[1, 2], [3, 4.0]], "prompt 1: item 1 is 4.0 (a float), not an integer token id."),
    (["hello", "a\ud800b"], "prompt 1 is not valid Unicode text: character 1 is the lone surrogate U+D800."),
    (["hello", 7.5], "prompt 1 is a float; expected a string or a list of integer token ids."),
    (["hello", ("a",)], "prompt 1 is a tuple; expected a string or a list of integer token ids."),
    ([[1, 2], []], "prompt 1: the prompt is empty."),
    (["hello", ""], "prompt 1: the prompt is empty."),
    ([[1, 2], [-1]], "prompt 1: token id -1 is outside the vocabulary"),
    ({"prompt": "hi"}, "prompts must be a string, a list of strings, a list of token ids or a list of token-id "
                       "lists, got a dict."),
    (None, "prompts must be a string, a list of strings, a list of token ids or a list of token-id lists, "
           "got a NoneType."),
])
def test_wrong_prompts_are_request_errors(llm, prompts, message):
    with pytest.raises(RequestError, match="^" + re.escape(message)):
        llm.generate(prompts, PARAMS)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests


def test_numpy_token_ids_are_accepted(llm):
    ids = [3, 1, 4, 1, 5]
    want = llm.generate([ids], PARAMS)[0].outputs[0].token_ids
    out = llm.generate([list(np.array(ids, dtype=np.int64))], PARAMS)[0]
    assert out.prompt_token_ids == ids and out.outputs[0].token_ids == want


def test_text_prompts_keep_their_text_and_are_encoded_once(llm, monkeypatch):
    calls = []
    encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text, **kw: calls.append(text) or encode(text, **kw))
    out = llm.generate(["hello world"], PARAMS)[0]
    assert calls == ["hello world"]  # checked and queued from one encoding (a 1M-token prompt costs seconds)
    assert out.prompt == "hello world" and out.prompt_token_ids == encode("hello world")


def test_no_prompts_generate_nothing(llm):
    # vLLM's behaviour: an empty batch is not an error (a caller filtering its prompts may end with none)
    assert llm.generate([]) == []
    assert llm.generate([], PARAMS) == []
    assert list(llm.generate([], PARAMS, stream=True)) == []
    assert llm.chat([]) == []
    assert not llm.engine.has_unfinished_requests()


def test_get_tokenizer_returns_the_tokenizer_or_names_the_folder(llm, tiny_checkpoint):
    assert llm.get_tokenizer() is llm.tokenizer
    assert llm.get_tokenizer().encode("hello") == llm.tokenizer.encode("hello")
    bare = LLM(tiny_checkpoint, dtype="float32", device="cpu", max_model_len=64)  # weights only, no tokenizer
    with pytest.raises(ConfigError, match="^" + re.escape(f"{tiny_checkpoint} has no tokenizer (tokenizer.json, "
                                                          "or vocab.json and merges.txt), so prompts must be "
                                                          "token ids.") + "$"):
        bare.get_tokenizer()
