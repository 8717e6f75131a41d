"""Tools, JSON mode, the model's defaults and max_tokens through the live server.

The model is a tiny random one with a real tokenizer and Qwen2.5's chat template. What it writes is
scripted where a test needs a tool call: ``Script`` wraps the engine's ``add_request`` (the real one
still runs) and adds a logits processor that forces a fixed token sequence, the way a trained model
would write it; the server's templating, parsing and streaming run unchanged. It also records each
request's prompt and SamplingParams, for the defaults tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_checkpoint
from live_server import assert_error, running
from tokenizer_utils import make_tokenizer_folder

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from qwen1m import LLM  # noqa: E402
from qwen1m.server.app import build_app  # noqa: E402
from qwen1m.tokenizer import Tokenizer  # noqa: E402

QWEN25 = (Path(__file__).parents[1] / "fixtures" / "qwen2_5_chat_template.jinja").read_text()
MODEL = "tiny"
MAX_MODEL_LEN = 1024
DEFAULT_MAX_TOKENS = 120
ENGINE = dict(dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def checkpoint(folder: Path, generation: dict | None = None) -> Path:
    """A tiny model with Qwen2.5's template; ``generation`` replaces its generation_config.json's
    sampling fields (make_tokenizer_folder writes Qwen2.5's: do_sample, temperature 0.7, top_p 0.8)."""
    make_tokenizer_folder(folder, QWEN25)
    path = folder / "generation_config.json"
    ids = {k: v for k, v in json.loads(path.read_text()).items() if k.endswith("token_id")}
    save_tiny_checkpoint(folder, seed=5, vocab_size=Tokenizer.from_folder(folder).vocab_size)
    if generation is not None:  # after save_pretrained, which writes its own generation_config.json
        path.write_text(json.dumps({**ids, **generation}))
    return folder


class Script:
    def __init__(self, engine):
        self.engine, self.add_request = engine, engine.add_request
        self.text: str | None = None  # what the next requests write, then EOS
        self.seen: list[tuple[str, object]] = []  # (prompt text, SamplingParams) of each request

    def __call__(self, prompt, params, request_id=None, **kw):
        tok = self.engine.tokenizer
        self.seen.append((tok.decode(prompt, skip_special_tokens=False), params))
        if self.text is not None:
            forced = tok.encode(self.text) + [tok.eos_token_ids[0]]

            def force(out, logits):
                masked = torch.full_like(logits, float("-inf"))
                masked[forced[min(len(out), len(forced) - 1)]] = 0.0
                return masked

            params.logits_processors = [*(params.logits_processors or []), force]
        return self.add_request(prompt, params, request_id, **kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    llm = LLM(checkpoint(tmp_path_factory.mktemp("tools_model")), **ENGINE)
    script = Script(llm.engine)
    llm.engine.add_request = script  # the engine loop calls it; the real add_request runs inside
    app = lambda server: build_app(llm, model_name=MODEL, default_max_tokens=DEFAULT_MAX_TOKENS)  # noqa: E731
    with running(app) as (_, url):
        yield url, script, llm


@pytest.fixture
def script(served):
    served[1].text = None
    served[1].seen.clear()
    return served[1]


@pytest.fixture
def client(served, script):  # script: every test starts unscripted
    with openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


# ---- tools --------------------------------------------------------------------------------------
def test_a_tool_call_comes_back_as_tool_calls(client, script):
    script.text = "Let me check.\n" + CALL
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = script.seen[-1][0]
    assert "# Tools" in prompt and json.dumps(WEATHER_TOOL["function"]["parameters"]) in prompt


def test_two_calls_streamed_as_openai_deltas(client, script):
    script.text = "Checking both.\n" + CALL + "\n" + CALL2
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], stream=True,
                                                 logprobs=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    # every token's logprob still goes out, though the call's tokens come back as one delta
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(streamed) == chunks[-1].usage.completion_tokens
    content = "".join(d.content or "" for d in deltas)
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert content.strip() == "Checking both." and "<tool" not in content
    assert [t.index for t in calls] == [0, 1] and len({t.id for t in calls}) == 2
    assert [json.loads(t.function.arguments)["city"] for t in calls] == ["Paris", "Rome"]
    assert all(t.function.name == "get_weather" and t.type == "function" for t in calls)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the stream holds the same as the whole answer
    whole = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    assert [(t.function.name, t.function.arguments) for t in whole.choices[0].message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in calls]


def test_malformed_call_stays_content_and_tool_choice_none_parses_nothing(client, script):
    script.text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content == script.text
    assert out.choices[0].finish_reason == "stop"
    script.text = CALL
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="none")
    assert out.choices[0].message.content == CALL and out.choices[0].message.tool_calls is None
    assert "# Tools" not in script.seen[-1][0]  # "none": the template does not get the tools either


def test_tool_history_renders_with_the_template(client, script):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    script.text = "It is 18 C and sunny in Paris."
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert out.choices[0].message.content == script.text and out.choices[0].finish_reason == "stop"
    prompt = script.seen[-1][0]
    # the arguments string became an object for the template (tojson of a string would escape it)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt


BAD_TOOL_REQUESTS = [
    ({"tool_choice": "required"}, ["'tool_choice'", "'required' is not supported yet"]),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     ["'tool_choice'", "named function is not supported yet"]),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     ["'tools.0.function.name' is required"]),
    ({"tools": [{"type": "retrieval"}]}, ["'tools.0.type'"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]},
     ["'tools.0.function.parameters'"]),
    ({"functions": [{"name": "f"}]}, ["'functions' is not supported"]),
    ({"function_call": "auto"}, ["'function_call' is not supported"]),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     ["'messages.1.tool_calls.0.function.arguments'", "not valid JSON"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     ["'response_format.type'", "'json_schema' is not supported"]),
    ({"response_format": {"type": "yaml"}}, ["'response_format.type'", "'yaml' is unknown"]),
    ({"response_format": {"type": "json_object"}, "max_tokens": 1}, ["max_tokens of at least 2", "got 1"]),
    ({"max_tokens": 200000}, ["max_tokens=200000", f"exceed max_model_len={MAX_MODEL_LEN}", "new tokens fit"]),
]


@pytest.mark.parametrize("body,words", BAD_TOOL_REQUESTS)
def test_bad_tool_and_format_requests_are_a_400_naming_the_field(served, body, words):
    body = {"messages": USER, "tools": [WEATHER_TOOL], **body}
    response = httpx.post(served[0] + "/v1/chat/completions", json=body, timeout=60)
    error = assert_error(response, 400, *words)
    if "max_tokens=200000" in words:
        assert error["code"] == "context_length_exceeded"
        assert "Request chatcmpl-" in error["message"]  # the error names the request


def test_tools_stay_refused_on_completions(served):
    response = httpx.post(served[0] + "/v1/completions", json={"prompt": "a", "tools": [WEATHER_TOOL]}, timeout=60)
    assert_error(response, 400, "'tools' is not supported")


# ---- JSON mode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [2, 5, None])
def test_json_mode_always_parses(client, script, max_tokens):
    kw = {} if max_tokens is None else {"max_tokens": max_tokens}
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, seed=seed, n=2,
                                             response_format={"type": "json_object"}, **kw)
        for choice in out.choices:
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    assert script.seen[-1][1].max_tokens == (max_tokens or DEFAULT_MAX_TOKENS)


def test_json_mode_streamed_and_on_completions(client, served):
    chunks = client.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, seed=7, max_tokens=12,
                                            response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    out = client.completions.create(model=MODEL, prompt="{", max_tokens=9, temperature=1.0, seed=1,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(out.choices[0].text), dict)
    off = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, response_format={"type": "text"})
    assert off.choices[0].message.content is not None


# ---- defaults and max_tokens --------------------------------------------------------------------
def near_the_limit(tokenizer, room: int) -> list[dict]:
    """Messages whose prompt leaves about ``room`` tokens (a little less) in MAX_MODEL_LEN."""
    words = 1
    while True:
        messages = [{"role": "user", "content": "fox " * words}]
        n = len(tokenizer.encode(tokenizer.apply_chat_template(messages)))
        if n > MAX_MODEL_LEN - room:
            return messages
        words += max(1, (MAX_MODEL_LEN - room - n) // 2)


def test_default_max_tokens_is_bounded_by_the_flag_and_the_room_left(client, script, served):
    client.chat.completions.create(model=MODEL, messages=USER)
    assert script.seen[-1][1].max_tokens == DEFAULT_MAX_TOKENS
    long = near_the_limit(served[2].tokenizer, room=DEFAULT_MAX_TOKENS // 2)
    client.chat.completions.create(model=MODEL, messages=long)
    prompt_tokens = len(served[2].tokenizer.encode(script.seen[-1][0]))
    assert MAX_MODEL_LEN - prompt_tokens < DEFAULT_MAX_TOKENS  # the prompt leaves less than the default
    assert script.seen[-1][1].max_tokens == MAX_MODEL_LEN - prompt_tokens
    client.completions.create(model=MODEL, prompt="hi")
    assert script.seen[-1][1].max_tokens == 16  # OpenAI's completions default
    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_MODEL_LEN - prompt_tokens} new tokens fit"):
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=DEFAULT_MAX_TOKENS)


@pytest.mark.parametrize("generation,expected", [
    ({"do_sample": False, "temperature": 0.9}, dict(temperature=0.0, top_p=1.0, top_k=0)),  # do_sample wins
    ({"do_sample": True, "temperature": 0.6, "top_k": 5, "repetition_penalty": 1.1, "max_new_tokens": 11},
     dict(temperature=0.6, top_p=1.0, top_k=5, repetition_penalty=1.1, max_tokens=11)),
    ({}, dict(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_tokens=DEFAULT_MAX_TOKENS)),
])
def test_fields_left_out_take_the_models_generation_config(tmp_path, generation, expected):
    llm = LLM(checkpoint(tmp_path / "m", generation), **ENGINE)
    script = Script(llm.engine)
    llm.engine.add_request = script
    with running(lambda server: build_app(llm, model_name=MODEL, default_max_tokens=DEFAULT_MAX_TOKENS)) as (_, url):
        body = {"messages": USER, "n": 3}
        out = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        params = script.seen[-1][1]
        assert {k: getattr(params, k) for k in expected} == expected
        texts = {c["message"]["content"] for c in out["choices"]}
        if expected["temperature"] == 0.0:  # greedy: the n choices are the same text
            assert len(texts) == 1
        httpx.post(url + "/v1/chat/completions", json={**body, "temperature": 1.3, "top_k": 2, "max_tokens": 3},
                   timeout=60).raise_for_status()
        params = script.seen[-1][1]
        assert (params.temperature, params.top_k, params.max_tokens) == (1.3, 2, 3)  # the request wins
