"""The OpenAI-compatible server, live on loopback, driven by the official openai client.

One uvicorn server runs in a thread of this process on a tiny random checkpoint with a real
tokenizer; references come from a separate ``LLM`` on the same checkpoint. The server's engine
takes 4 sequences at a time and 48 tokens per step, so concurrent requests queue and prompts over
48 tokens prefill in chunks.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from checkpoints import save_tiny_checkpoint
from live_server import running
from tokenizer_utils import make_tokenizer_folder

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from qwen1m import LLM, SamplingParams  # noqa: E402
from qwen1m.server.app import build_app  # noqa: E402

CHATML = (Path(__file__).parents[1] / "fixtures" / "chatml_template.jinja").read_text()
API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 1024
ENGINE = dict(dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN)
# Every wait in this file is for an explicit condition and gives up only after TIMEOUT seconds, a
# hang guard: on a slow, loaded machine things take longer, but never change order.
TIMEOUT = 30.0
WORDS = "the quick brown fox jumps over the lazy dog while long context models read whole books".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qwen1m.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("server_model")
    make_tokenizer_folder(folder, CHATML)
    save_tiny_checkpoint(folder, seed=31, vocab_size=Tokenizer.from_folder(folder).vocab_size)
    return folder


@pytest.fixture(scope="module")
def ref(checkpoint):
    return LLM(checkpoint, **ENGINE)


@pytest.fixture(scope="module")
def server_llm(checkpoint):
    # prefix caching on: every test below then also checks that reused prefixes change no output
    return LLM(checkpoint, **ENGINE, max_num_batched_tokens=48, max_num_seqs=4, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def base_url(server_llm):
    with running(lambda server: build_app(server_llm, model_name=MODEL, api_key=API_KEY)) as (_, url):
        yield url


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def metrics(base_url: str) -> dict[str, float]:
    # with an API key /metrics needs it too (unless --metrics-public)
    text = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_until_idle(base_url: str) -> dict[str, float]:
    """The metrics once the engine reports no request running or waiting and an empty KV cache.

    The engine thread updates these gauges at the end of each pass of its loop, after it has counted
    the requests that finished or were aborted in that pass, so once a request that showed in the
    gauges (one in the engine for more than one step) has ended, idle gauges also mean its counters
    are settled.
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        m = metrics(base_url)
        gauges = {k: m[f"qwen1m_{k}"] for k in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}
        if not any(gauges.values()):
            return m
        assert time.monotonic() < deadline, f"the engine is still busy after {TIMEOUT:.0f} s: {gauges}"
        time.sleep(0.02)


def prompt_of(num_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(num_words))


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


# ---- completions and chat -------------------------------------------------------------------------
def test_health_and_models(base_url, client):
    assert httpx.get(base_url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_streamed_equals_whole_equals_generate(client, ref):
    prompt = "The quick brown fox"
    expected = ref.generate([prompt], greedy(12, ignore_eos=True))[0].outputs[0]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "length"
    n_prompt = len(ref.tokenizer.encode(prompt))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        n_prompt, 12, n_prompt + 12)

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_shared_long_system_prompt_is_reused(client, ref, base_url):
    system = {"role": "system", "content": " ".join(WORDS * 12)}
    hits = "qwen1m_prefix_cache_hit_tokens_total"
    for question, cached in (("Name a fox.", False), ("Name a dog.", True)):
        before = metrics(base_url)[hits]
        messages = [system, {"role": "user", "content": question}]
        expected = ref.chat(messages, greedy(6))[0].outputs[0]
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        assert whole.choices[0].message.content == expected.text
        details = whole.usage.prompt_tokens_details
        assert (details.cached_tokens >= 64) == cached and details.cached_tokens < whole.usage.prompt_tokens
        assert metrics(base_url)[hits] - before == details.cached_tokens


def test_chat_streamed_equals_whole_equals_llm_chat(client, ref):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]
    expected = ref.chat(messages, greedy(10))[0].outputs[0]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage.completion_tokens == len(expected.token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_n_seed_top_p_and_stop(client, ref):
    prompt = "Long context models"
    sp = SamplingParams(n=2, max_tokens=8, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    expected = [o.text for o in ref.generate([prompt], sp)[0].outputs]
    out = client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=8, temperature=0.9, top_p=0.9,
                                    seed=5, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected

    # a stop string from the middle of the greedy answer: the text ends before it, streamed or not
    full = ref.generate([prompt], greedy(20, ignore_eos=True))[0].outputs[0].text
    stop = full[6:9]
    cut = ref.generate([prompt], greedy(20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (cut.text, "stop")
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=stop,
                                         extra_body={"ignore_eos": True}, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_prompt_list_and_token_ids(client, ref):
    prompts = ["The dog", "Attention is computed"]
    expected = [o.outputs[0].text for o in ref.generate(prompts, greedy(5, ignore_eos=True))]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    ids = ref.tokenizer.encode(prompts[1])
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected[1]


def test_sixteen_concurrent_clients(base_url, client, ref):
    """Different prompt lengths (several over one 48-token step), half streamed; the engine takes 4
    at a time, so most wait in its queue; every answer matches LLM.generate on its own."""
    prompts = [prompt_of(3 + 9 * i) for i in range(16)]
    expected = [o.outputs[0].text for o in ref.generate(prompts, greedy(8, ignore_eos=True))]
    before = wait_until_idle(base_url)

    def ask(i: int) -> tuple[str, str, int]:
        kw = dict(model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
        if i % 2:
            chunks = list(client.completions.create(**kw, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c for c in chunks if c.choices][-1].choices[0].finish_reason
            return text, finish, chunks[-1].usage.completion_tokens
        out = client.completions.create(**kw)
        return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert [a[0] for a in answers] == expected
    assert all(a[1:] == ("length", 8) for a in answers)
    # The engine thread hands a client its last output before it counts the request and updates the
    # gauges (both right after, in the same loop pass), so a scrape at once may still see the request
    # running: wait for the engine to report idle, which it does only after that pass.
    after = wait_until_idle(base_url)
    key = 'qwen1m_requests_total{finish_reason="length"}'
    assert after[key] - before[key] == 16
    assert after["qwen1m_generation_tokens_total"] - before["qwen1m_generation_tokens_total"] == 16 * 8
    assert after["qwen1m_num_requests_running"] == 0 and after["qwen1m_kv_cache_usage_perc"] == 0


# ---- cancellation ----------------------------------------------------------------------------------
class HoldGeneration:
    """Stands in for ``engine.step``: real steps until a request's text has grown ``chunks`` times (so
    a streamed answer has sent that many chunks), then steps that do nothing. The request stays in
    flight, holding its KV cache, for as long as the test needs, and cannot finish on its own; the
    engine loop still applies aborts, so only a cancellation ends it, however slow the machine."""

    def __init__(self, real_step, chunks: int):
        self._step, self.chunks = real_step, chunks
        self._texts: dict[str, str] = {}
        self._grown: dict[str, int] = {}
        self.holding = threading.Event()  # set once the engine loop has applied the last real step

    def __call__(self):  # on the engine thread
        if max(self._grown.values(), default=0) >= self.chunks:
            self.holding.set()  # the loop updated the gauges after the last real step: they show the request
            time.sleep(0.005)  # do nothing, without spinning
            return []
        outputs = self._step()
        for out in outputs:
            text = out.outputs[0].text
            if len(text) > len(self._texts.get(out.request_id, "")):  # a streamed answer sends a chunk
                self._grown[out.request_id] = self._grown.get(out.request_id, 0) + 1
            self._texts[out.request_id] = text
        return outputs


def test_disconnect_mid_stream_frees_the_kv_cache(base_url, server_llm, monkeypatch):
    """The engine holds each request mid-generation (HoldGeneration) until the client has gone, so the
    request is certainly running when the client leaves and can end only by being cancelled."""
    aborted = 'qwen1m_requests_total{finish_reason="abort"}'
    before = wait_until_idle(base_url)[aborted]
    real_step = server_llm.engine.step
    gate = HoldGeneration(real_step, chunks=3)
    monkeypatch.setattr(server_llm.engine, "step", gate)
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", base_url + "/v1/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            data, lines = [], response.iter_lines()  # kept: a dropped iterator closes the connection
            for line in lines:
                if line.startswith("data: "):
                    data.append(json.loads(line[6:]))
                if len(data) == 3:
                    break
            assert gate.holding.wait(TIMEOUT)  # the request stays mid-generation from here on
            busy = metrics(base_url)
            assert busy["qwen1m_num_requests_running"] == 1 and busy["qwen1m_kv_cache_usage_perc"] > 0
        # leaving the block closes the connection mid-stream
    # the held request cannot finish by itself: only the server's abort makes the engine idle
    after = wait_until_idle(base_url)
    assert after["qwen1m_num_requests_running"] == 0 and after["qwen1m_kv_cache_usage_perc"] == 0
    assert after[aborted] == before + 1

    # a client that gives up on a whole (non-streamed) answer cancels it too: it sends the request,
    # waits until the engine holds it mid-generation, then closes the connection without an answer
    gate = HoldGeneration(real_step, chunks=3)
    monkeypatch.setattr(server_llm.engine, "step", gate)
    body["stream"] = False
    url = httpx.URL(base_url)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((url.host, url.port), timeout=TIMEOUT) as sock:
        sock.sendall(head + payload)
        assert gate.holding.wait(TIMEOUT)
        busy = metrics(base_url)
        assert busy["qwen1m_num_requests_running"] == 1 and busy["qwen1m_kv_cache_usage_perc"] > 0
    after = wait_until_idle(base_url)
    assert after["qwen1m_kv_cache_usage_perc"] == 0 and after[aborted] == before + 2


# ---- errors -----------------------------------------------------------------------------------------
LONG_PROMPT = prompt_of(1500)  # well over MAX_MODEL_LEN tokens

ERROR_CASES = [
    # (route, body, status, words the message must contain)
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, ["max_model_len is 1024", "the prompt has"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     ["max_model_len is 1024"]),
    ("/v1/completions", {"prompt": "a", "temperature": 3}, 400, ["'temperature'", "less than or equal to 2"]),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, ["'top_p'"]),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, ["'n'"]),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, ["'max_tokens'"]),
    ("/v1/completions", {"prompt": "a", "max_tokens": "many"}, 400, ["'max_tokens'", "integer"]),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, 400, ["stop"]),
    ("/v1/completions", {"prompt": "a", "use_beam_search": True}, 400, ["'use_beam_search' is not supported"]),
    ("/v1/completions", {"prompt": []}, 400, ["prompt must not be empty"]),
    ("/v1/completions", {"prompt": [10**6]}, 400, ["outside the vocabulary"]),
    ("/v1/completions", {}, 400, ["'prompt' is required"]),
    ("/v1/chat/completions", {"messages": []}, 400, ["'messages'"]),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, ["role"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     ["only text content parts"]),
    ("/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404,
     ["'gpt-9' does not exist", f"serves '{MODEL}'"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404,
     ["'gpt-9'"]),
    ("/v1/nothing", {}, 404, ["/v1/completions"]),
]


@pytest.mark.parametrize("route,body,status,words", ERROR_CASES)
def test_errors_are_openai_error_objects(base_url, route, body, status, words):
    response = httpx.post(base_url + route, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=TIMEOUT)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    if "max_model_len is 1024" in words:  # both numbers: the prompt's length and the limit
        assert re.search(r"the prompt has \d{4} tokens", error["message"]), error["message"]
        assert error["code"] == "context_length_exceeded"


def test_errors_through_the_openai_client_then_keeps_serving(base_url, client, ref):
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       temperature=7)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="a")
    for key in ("wrong-key", None):
        bad = openai.OpenAI(base_url=base_url + "/v1", api_key=key or "placeholder", max_retries=0)
        headers = {} if key else {"Authorization": ""}
        with pytest.raises(openai.AuthenticationError, match="API key"):
            bad.completions.create(model=MODEL, prompt="a", extra_headers=headers)
    response = httpx.get(base_url + "/v1/models", timeout=TIMEOUT)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    # still serving, correctly
    expected = ref.generate(["The dog"], greedy(4, ignore_eos=True))[0].outputs[0].text
    out = client.completions.create(model=MODEL, prompt="The dog", max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected


def test_engine_failure_is_a_500_and_the_server_recovers(base_url, client, server_llm, monkeypatch):
    real_step = server_llm.engine.step
    failures = iter([RuntimeError("simulated device error")] * 2)

    def failing_step():
        error = next(failures, None)
        if error is not None:
            raise error
        return real_step()

    monkeypatch.setattr(server_llm.engine, "step", failing_step)
    with pytest.raises(openai.InternalServerError, match="simulated device error"):
        client.completions.create(model=MODEL, prompt="The dog", max_tokens=4)
    body = {"prompt": "The dog", "max_tokens": 4, "stream": True}
    response = httpx.post(base_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=TIMEOUT)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert "simulated device error" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    assert wait_until_idle(base_url)["qwen1m_kv_cache_usage_perc"] == 0
    out = client.completions.create(model=MODEL, prompt="The dog", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


# ---- metrics and logs --------------------------------------------------------------------------------
def test_metrics_are_prometheus_text(base_url, client):
    client.completions.create(model=MODEL, prompt="The dog", max_tokens=3, temperature=0)
    assert httpx.get(base_url + "/metrics", timeout=TIMEOUT).status_code == 401
    response = httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name, kind in [("qwen1m_requests_total", "counter"), ("qwen1m_prompt_tokens_total", "counter"),
                       ("qwen1m_generation_tokens_total", "counter"),
                       ("qwen1m_prefix_cache_hit_tokens_total", "counter"),
                       ("qwen1m_time_to_first_token_seconds", "histogram"),
                       ("qwen1m_inter_token_latency_seconds", "histogram"),
                       ("qwen1m_num_requests_running", "gauge"), ("qwen1m_num_requests_waiting", "gauge"),
                       ("qwen1m_kv_cache_usage_perc", "gauge")]:
        assert f"# TYPE {name} {kind}" in text
    m = metrics(base_url)
    ttft = "qwen1m_time_to_first_token_seconds"
    assert m[ttft + '_bucket{le="+Inf"}'] == m[ttft + "_count"] > 0
    assert m["qwen1m_inter_token_latency_seconds_count"] > 0
    assert m['qwen1m_http_requests_total{route="/v1/completions",status="200"}'] > 0
    sample = re.compile(r'[a-z0-9_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+')  # name{labels} value
    for line in text.splitlines():
        assert line.startswith("#") or sample.fullmatch(line), line


def test_long_prefill_logs_progress(client, caplog):
    caplog.set_level(logging.INFO, logger="qwen1m.server")
    client.completions.create(model=MODEL, prompt=prompt_of(150), max_tokens=1)
    lines = [r.getMessage() for r in caplog.records if "prefill" in r.getMessage()]
    assert len(lines) >= 2, lines  # over 48 tokens per step: several steps, one line each
    assert re.search(r"prefill cmpl-\w+-0: \d+ / \d+ tokens \(\d+\.\d%\), \d+ tokens/s", lines[0])
    assert re.search(r"(\d+) / \1 tokens \(100\.0%\)", lines[-1])
