"""Sampling fields through the live server and the openai client: logprobs in OpenAI's shapes
(completions, chat, streamed and whole), echo, penalties and logit_bias as the engine applies them,
and a 400 naming any field the server does not support, top-level or sent through extra_body."""

from __future__ import annotations

import json
import math

import pytest
from live_server import assert_error, running, text_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from qwen1m import LLM, SamplingParams  # noqa: E402
from qwen1m.server.app import build_app  # noqa: E402

MODEL = "tiny"
ENGINE = dict(dtype="float32", device="cpu", max_model_len=512)
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return text_checkpoint(tmp_path_factory.mktemp("sampling_server"))


@pytest.fixture(scope="module")
def ref(checkpoint):
    return LLM(checkpoint, **ENGINE)


@pytest.fixture(scope="module")
def base_url(checkpoint):
    llm = LLM(checkpoint, **ENGINE, max_num_batched_tokens=16)  # prompts prefill in chunks
    with running(lambda server: build_app(llm, model_name=MODEL)) as (_, url):
        yield url


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def reference(ref, prompt, **kw):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, **kw)
    return ref.generate([prompt], params)[0]


def test_completion_logprobs_whole_and_streamed(client, ref):
    want = reference(ref, PROMPT, logprobs=3).outputs[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert out.choices[0].text == want.text
    assert lp.token_logprobs == pytest.approx([e[t].logprob for e, t in zip(want.logprobs, want.token_ids)], abs=1e-5)
    assert lp.tokens == [ref.tokenizer.decode([t], skip_special_tokens=False) for t in want.token_ids]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(5)]
    for top, entry in zip(lp.top_logprobs, want.logprobs):  # keyed by text: tokens may share one
        texts = {ref.tokenizer.decode([t], skip_special_tokens=False) for t in entry}
        assert set(top) == texts and max(top.values()) == pytest.approx(max(e.logprob for e in entry.values()))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                            stream=True, extra_body={"ignore_eos": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_echo_puts_the_prompt_and_its_logprobs_first(client, ref):
    want = reference(ref, PROMPT, logprobs=1, prompt_logprobs=1)
    n_prompt = len(want.prompt_token_ids)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1, echo=True,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == PROMPT + want.outputs[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 5 and lp.token_logprobs[0] is None
    prompt_lps = [e[t].logprob for e, t in zip(want.prompt_logprobs[1:], want.prompt_token_ids[1:])]
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(prompt_lps, abs=1e-5)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_chat_logprobs_whole_and_streamed(client, ref):
    messages = [{"role": "user", "content": "hello there"}]
    want = ref.chat(messages, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2))[0].outputs[0]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e[t].logprob for e, t in zip(want.logprobs, want.token_ids)],
                                                         abs=1e-5)
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].token == c.token  # greedy: the chosen token is the most likely
        assert bytes(c.bytes).decode("utf-8", errors="replace") == c.token
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_penalties_and_logit_bias_reach_the_engine(client, ref):
    kw = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.8)
    want = reference(ref, PROMPT, logit_bias={7: 100.0}, **kw).outputs[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                    presence_penalty=1.5, frequency_penalty=0.5, logit_bias={"7": 100},
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
    assert out.choices[0].text == want.text and want.token_ids == [7] * 5  # a bias of 100 wins anyway
    no_bias = reference(ref, PROMPT, repetition_penalty=1.8).outputs[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
    assert out.choices[0].text == no_bias.text
    assert no_bias.token_ids != reference(ref, PROMPT).outputs[0].token_ids  # the penalty changed something
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, n=2, best_of=2, temperature=1.0,
                                    seed=3)
    assert len(out.choices) == 2


@pytest.mark.parametrize("body,words", [
    ({"use_beam_search": True}, ["'use_beam_search' is not supported"]),
    ({"length_penalty": 1.2}, ["'length_penalty' is not a field this server knows"]),
    ({"guided_json": {"type": "object"}}, ["'guided_json'"]),
    ({"suffix": "end"}, ["'suffix' is not supported"]),
    ({"best_of": 3}, ["'best_of' must equal n (1)"]),
    ({"logprobs": 21}, ["'logprobs'"]),
    ({"logit_bias": {"abc": 1}}, ["'logit_bias'", "token ids"]),
    ({"logit_bias": {"999999": 1}}, ["logit_bias token id 999999 is outside the vocabulary"]),
    ({"presence_penalty": 2.5}, ["'presence_penalty'"]),
    ({"repetition_penalty": 0}, ["'repetition_penalty'"]),
])
def test_unsupported_or_bad_fields_are_a_400_that_names_them(base_url, body, words):
    response = httpx.post(base_url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, **body}, timeout=30)
    assert_error(response, 400, *words)


def test_unknown_fields_through_extra_body_and_chat(client, base_url):
    with pytest.raises(openai.BadRequestError, match="'use_beam_search' is not supported"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body={"use_beam_search": True})
    with pytest.raises(openai.BadRequestError, match="'top_logprobs' needs 'logprobs': true"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="'echo' is not a field"):  # echo is for completions only
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"echo": True})
    ok = client.completions.create(model=MODEL, prompt="a", max_tokens=2, user="someone")  # ignored, as OpenAI's
    assert ok.choices[0].text is not None


def test_infinite_logprobs_are_sent_as_json_numbers(base_url):
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 0, "echo": True,
            "logit_bias": {"5": -100}}
    response = httpx.post(base_url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    values = [v for v in response.json()["choices"][0]["logprobs"]["token_logprobs"] if v is not None]
    assert all(math.isfinite(v) for v in values) and json.loads(response.text)
