"""Server limits: input limits before work (defect 3), admission control (defect 4) and exposure (defect 8).

Nothing here asserts a time (the figures for the issue's latency targets come from
benchmarks/bench_server_limits.py): each property is shown by what happens, e.g. a 413 that arrives while
most of the body is still unsent proves the body was not read, and TIMEOUT is only a hang guard.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from live_server import TIMEOUT, assert_error, assert_serving, free_port, running, text_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from qwen1m import LLM  # noqa: E402
from qwen1m.cache.paged_kv import PagedKVCache  # noqa: E402
from qwen1m.cli import build_parser  # noqa: E402
from qwen1m.server.app import build_app  # noqa: E402
from qwen1m.server.cli import resolve_api_key  # noqa: E402
from qwen1m.server.limits import default_max_request_bytes  # noqa: E402

MAX_MODEL_LEN = 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return text_checkpoint(tmp_path_factory.mktemp("limits"))


@pytest.fixture(scope="module")
def llm(folder):
    cfg = json.loads((folder / "config.json").read_text())
    per_token = PagedKVCache.bytes_per_token(cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                                             cfg["hidden_size"] // cfg["num_attention_heads"], torch.float32, False)
    # KV for 3 sequences of max_model_len: n=6 of them could never all be reserved up front
    return LLM(folder, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, block_size=16,
               kv_cache_memory=3 * MAX_MODEL_LEN * per_token)


@pytest.fixture(scope="module")
def served(llm):
    holder = {}

    def build(server):
        holder["app"] = build_app(llm, model_name="tiny")  # no API key: loopback Host names only
        return holder["app"]

    with running(build) as (_, url):
        yield holder["app"], url


# ---- defect 3: a large body froze the server ---------------------------------------------------------
@pytest.fixture(scope="module")
def serve_process(folder):
    """``qwen1m serve`` in its own process, so that its memory is measured apart from the client's."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen1m.cli", "serve", "--model", str(folder), "--device", "cpu",
                             "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "QWEN1M_API_KEY": "", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "qwen1m serve did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(TIMEOUT) == 0  # a graceful exit
        finally:
            if proc.poll() is None:
                proc.kill()


def _open_upload(url: str, declared: int, sent: bytes) -> socket.socket:
    """A POST whose headers declare ``declared`` body bytes, of which only ``sent`` goes out."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {declared}\r\n\r\n".encode() + sent)
    return conn


def _read_response(conn: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int({k.lower(): v for k, v in headers.items()}[b"content-length"])
    while len(body) < length:
        body += conn.recv(65536)
    return int(head.split()[1]), body


def test_a_50_mb_body_is_refused_before_it_is_read_while_health_answers(serve_process):
    proc, url = serve_process
    limit = default_max_request_bytes(MAX_MODEL_LEN)
    assert_serving(url)
    # 1. Declared 50 MB, 1 KB sent: the 413 arrives with 99.998% of the body unsent, so the server
    #    did not wait for, read, parse or tokenize it; /health answers while that upload stays open.
    conn = _open_upload(url, 50 << 20, b'{"prompt": "' + b"x" * 1024)
    try:
        status, body = _read_response(conn)
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
    finally:
        conn.close()
    assert status == 413, body
    error = json.loads(body)["error"]
    assert f"limit of {limit} bytes" in error["message"] and "--max-request-bytes" in error["message"]
    assert error["code"] == "request_too_large"

    # 2. The whole 50 MB sent by a client: 413 again, /health answers 200 throughout, and nothing of
    #    the body stays in the server's memory.
    payload = json.dumps({"prompt": "x" * (50 << 20)}).encode()
    answers, stop = [], threading.Event()

    def poll_health():
        with httpx.Client(timeout=TIMEOUT) as client:
            while not stop.is_set():
                answers.append(client.get(url + "/health").status_code)
                time.sleep(0.01)

    before = rss_bytes(proc.pid)
    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        response = httpx.post(url + "/v1/completions", content=payload, timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"})
    finally:
        stop.set()
        poller.join(TIMEOUT)
    error = assert_error(response, 413, f"limit of {limit} bytes", "--max-request-bytes")
    assert error["code"] == "request_too_large"
    assert answers and set(answers) == {200}, answers
    assert rss_bytes(proc.pid) < 1.1 * before, (before, rss_bytes(proc.pid))  # nothing of the body stayed
    assert_serving(url)


def test_a_chunked_body_is_cut_off_at_the_limit(served):
    _, url = served
    limit = default_max_request_bytes(MAX_MODEL_LEN)

    def chunks():  # no Content-Length: the server counts what arrives
        yield b'{"prompt": "'
        for _ in range(limit // (1 << 20) + 2):
            yield b"y" * (1 << 20)
        yield b'"}'

    response = httpx.post(url + "/v1/completions", content=chunks(), timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert_error(response, 413, "over this server's limit")
    assert_serving(url)


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(served, monkeypatch):
    app, url = served
    pool = app.state.serving.tokenizer_pool
    sent = []
    monkeypatch.setattr(pool._executor, "submit", lambda *a, **k: sent.append(a) or pytest.fail("tokenized"))
    prompt = "z" * (MAX_MODEL_LEN * pool.max_token_bytes)  # at least max_model_len tokens, whatever the merges
    response = httpx.post(url + "/v1/completions", json={"prompt": prompt}, timeout=TIMEOUT)
    error = assert_error(response, 400, "at least 1024 tokens", "max_model_len is 1024")
    assert error["code"] == "context_length_exceeded" and not sent
    monkeypatch.undo()
    assert_serving(url)


# ---- defect 4: head-of-line blocking, unbounded queues -------------------------------------------------
def test_a_4_token_request_is_answered_while_a_large_n_chat_runs(served):
    """n=6 chats with no max_tokens may each run to max_model_len; the KV cache holds three of those.
    A 4-token request sent while they generate is answered while they still run: it was not queued
    behind them (its latency is benchmarks/bench_server_limits.py's figure, not asserted here)."""
    _, url = served
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "n": 6, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as big:
            assert big.status_code == 200
            lines = big.iter_lines()
            contents = 0
            for line in lines:  # wait until all six are generating
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    contents += 1
                if contents >= 6:
                    break
            small = httpx.post(url + "/v1/completions", timeout=TIMEOUT,
                               json={"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 4
            running = [line for line in httpx.get(url + "/metrics", timeout=TIMEOUT).text.splitlines()
                       if line.startswith("qwen1m_num_requests_running ")]
            assert float(running[0].split()[1]) >= 1  # the big one is still generating
    assert_serving(url)


def test_a_full_queue_answers_429_with_retry_after(served, llm, monkeypatch):
    app, url = served
    serving = app.state.serving
    monkeypatch.setattr(serving.gate, "limit", 1)
    release, real_step = threading.Event(), llm.engine.step

    def held_step():  # nothing starts until released: the first request stays queued
        if not release.is_set():
            time.sleep(0.005)
            return []
        return real_step()

    monkeypatch.setattr(llm.engine, "step", held_step)
    first = {}
    waiter = threading.Thread(target=lambda: first.update(r=httpx.post(
        url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=TIMEOUT)))
    waiter.start()
    deadline = time.monotonic() + TIMEOUT
    while serving.gate.queued < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=TIMEOUT)
    error = assert_error(busy, 429, "--max-queued-requests 1")
    assert error["type"] == "rate_limit_error" and busy.headers["retry-after"] == "1"
    release.set()
    waiter.join(TIMEOUT)
    assert first["r"].status_code == 200
    assert serving.gate.queued == 0
    assert_serving(url)


@pytest.mark.parametrize("body,words", [
    ({"prompt": ["a"] * 65}, ["65 prompts", "at most 64", "--max-prompts-per-request"]),
    ({"prompt": "a", "n": 129}, ["'n'", "less than or equal to 128"]),
    ({"prompt": "a", "stop": ["s"] * 17}, ["'stop'"]),
])
def test_requests_past_the_documented_limits_are_400(served, body, words):
    _, url = served
    assert_error(httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT), 400, *words)


# ---- defect 8: exposure ------------------------------------------------------------------------------
def test_without_a_key_only_loopback_host_names_are_answered(served):
    _, url = served
    rebound = httpx.get(url + "/v1/models", headers={"Host": "attacker.example:8000"}, timeout=TIMEOUT)
    error = assert_error(rebound, 400, "'attacker.example:8000'", "--allowed-hosts")
    assert error["code"] == "invalid_host"
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}, timeout=TIMEOUT).status_code == 200


def test_exposure_options(llm):
    # (no lifespan: these routes never reach the engine)
    allowed = TestClient(build_app(llm, model_name="tiny", allowed_hosts=["box.lan"]), base_url="http://box.lan")
    assert allowed.get("/v1/models").status_code == 200
    keyed = TestClient(build_app(llm, model_name="tiny", api_key="k"), base_url="http://any.example")
    assert keyed.get("/v1/models").status_code == 401  # any Host with a key, but the key is needed
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    assert keyed.get("/openapi.json").status_code == 404 and keyed.get("/docs").status_code == 404
    assert keyed.get("/health").status_code == 503  # no key needed (the loop is not started here)
    public = TestClient(build_app(llm, model_name="tiny", api_key="k", metrics_public=True))
    assert public.get("/metrics").status_code == 200
    # CORS is off unless origins are named
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    local = TestClient(build_app(llm, model_name="tiny"), base_url="http://localhost")
    assert "access-control-allow-origin" not in local.options("/v1/completions", headers=preflight).headers
    cors = TestClient(build_app(llm, model_name="tiny", cors_origins=["https://app.example"]),
                      base_url="http://localhost")
    answer = cors.options("/v1/completions", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


def test_the_api_key_comes_from_the_environment(monkeypatch):
    args = build_parser().parse_args(["serve"])
    monkeypatch.setenv("QWEN1M_API_KEY", "from-env")
    assert resolve_api_key(args) == "from-env"
    monkeypatch.setenv("QWEN1M_API_KEY", "")
    assert resolve_api_key(args) is None
    assert resolve_api_key(build_parser().parse_args(["serve", "--api-key", "flag"])) == "flag"
