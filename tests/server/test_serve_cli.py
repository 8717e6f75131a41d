"""``qwen1m serve`` as a process: binds loopback by default, serves, and shuts down cleanly on SIGTERM."""

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
from checkpoints import save_tiny_checkpoint
from live_server import free_port
from tokenizer_utils import make_tokenizer_folder

from qwen1m.cli import build_parser

httpx = pytest.importorskip("httpx")
h11 = pytest.importorskip("h11")  # httpx's HTTP/1.1 parser
pytest.importorskip("uvicorn")

CHATML = (Path(__file__).parents[1] / "fixtures" / "chatml_template.jinja").read_text()


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "--model", "somewhere"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


TIMEOUT = 60  # hang guard for every wait below; each returns as soon as its condition holds
GRACE_S = 2  # --shutdown-timeout: in-flight requests get this long after SIGTERM
LONG_TOKENS = 16000  # seconds of generation even on a fast machine: always cut off by the grace period's end


def stream_completion(url: str, max_tokens: int, started: threading.Event, result: dict) -> None:
    body = {"prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, finish, done, error = "", None, False, None
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT,
                          headers={"Authorization": "Bearer k"}) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:  # OpenAI's in-stream error event
                        error = event["error"]
                        continue
                    choice = event["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
                    started.set()
    except httpx.HTTPError as e:  # the server cut the connection
        result["error"] = type(e).__name__
    result.update(text=text, finish=finish, done=done, error_event=error)
    started.set()


class HeldRequest:
    """A streamed completion whose body the client holds back. With ``Expect: 100-continue`` the server
    says when its handler is waiting for the body, so the request is provably in flight; ``finish``
    then sends the body and reads the whole answer (h11 parses the HTTP, chunked encoding included)."""

    def __init__(self, port: int, body: dict):
        self.payload = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.conn = h11.Connection(h11.CLIENT)
        headers = [("Host", f"127.0.0.1:{port}"), ("Authorization", "Bearer k"), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(self.payload))), ("Expect", "100-continue")]
        self.sock.sendall(self.conn.send(h11.Request(method="POST", target="/v1/completions", headers=headers)))

    def _next_event(self):
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            self.conn.receive_data(self.sock.recv(65536))
        return event

    def wait_until_in_flight(self) -> None:
        event = self._next_event()
        assert isinstance(event, h11.InformationalResponse) and event.status_code == 100, event

    def finish(self) -> dict:
        self.sock.sendall(self.conn.send(h11.Data(data=self.payload)) + self.conn.send(h11.EndOfMessage()))
        result, body = {}, b""
        try:
            result["status"] = getattr(self._next_event(), "status_code", None)
            while isinstance(event := self._next_event(), h11.Data):
                body += event.data
            assert isinstance(event, h11.EndOfMessage), event
        except h11.RemoteProtocolError as e:  # the server cut the connection
            result["error"] = repr(e)
        finally:
            self.sock.close()
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        choices = [c for e in events if e != "[DONE]" for c in json.loads(e).get("choices", [])]
        finish = next((c["finish_reason"] for c in reversed(choices) if c["finish_reason"]), None)
        return {**result, "done": events[-1:] == ["[DONE]"], "finish": finish, "events": len(events)}


def wait_for_line(proc: subprocess.Popen, lines: list[str], text: str) -> None:
    """Return once the server has printed a line containing ``text``."""
    deadline = time.monotonic() + TIMEOUT
    while not any(text in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(lines)
        time.sleep(0.02)


def test_sigterm_finishes_short_requests_and_cancels_long_ones(tmp_path):
    """Ordered by events, not sleeps: the long request is generating and the short one is in flight (its
    handler waits for the body) when SIGTERM arrives; the short one's body goes out once uvicorn says it
    waits for connections to close, so all of its generation happens inside the grace period (with no
    grace period the short one is cut too). Its few steps take milliseconds against GRACE_S seconds;
    the long one cannot finish within them."""
    from qwen1m.tokenizer import Tokenizer

    make_tokenizer_folder(tmp_path, CHATML)
    save_tiny_checkpoint(tmp_path, seed=41, vocab_size=Tokenizer.from_folder(tmp_path).vocab_size)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "qwen1m.cli", "serve", "--model", str(tmp_path), "--dtype", "float32",
           "--device", "cpu", "--max-model-len", str(LONG_TOKENS + 384), "--port", str(port), "--api-key", "k",
           "--shutdown-timeout", str(GRACE_S)]
    # one torch thread: on a busy 2-core machine, OpenMP threads that wait for each other at every op
    # make each step ten times slower (measured), which ate into the grace period
    env = {**os.environ, "QWEN1M_API_KEY": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []  # the server's output so far: a reader thread drains the pipe, which never fills

    def read_output() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, f"qwen1m serve did not start within {TIMEOUT} s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=TIMEOUT).json()
        assert models["data"][0]["id"] == tmp_path.name

        long, started = {}, threading.Event()
        long_thread = threading.Thread(target=stream_completion, args=(url, LONG_TOKENS, started, long))
        long_thread.start()
        held = HeldRequest(port, {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0,
                                  "ignore_eos": True, "stream": True})
        assert started.wait(TIMEOUT)  # the long request is generating
        held.wait_until_in_flight()
        proc.send_signal(signal.SIGTERM)
        wait_for_line(proc, lines, "Waiting for connections to close")  # uvicorn's grace period has begun
        short = held.finish()
        long_thread.join(TIMEOUT)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(TIMEOUT)
    output = "".join(lines)
    assert proc.returncode == 0, output  # a graceful exit, not uvicorn's re-raised SIGTERM (143)
    assert short.get("status") == 200 and short["done"] and short["finish"] == "length", (short, output)
    # still running when the grace period ended: a final error event and [DONE], not a cut connection
    assert long["finish"] is None and "error" not in long, long
    assert long["error_event"]["type"] == "service_unavailable_error", long
    assert "shutting down" in long["error_event"]["message"] and long["done"], long
    assert "Traceback" not in output, output


def test_openai_client_against_serve_on_the_bundled_model():
    """`qwen1m serve` with no --model serves the bundled model; the official client gets the pass key."""
    openai = pytest.importorskip("openai")
    from qwen1m import LLM, SamplingParams
    from qwen1m.train.data import passkey_prompt

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen1m.cli", "serve", "--device", "cpu", "--port", str(port),
                             "--max-model-len", "8192"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "qwen1m serve did not start within 90 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
        model = client.models.list().data[0].id
        llm = LLM(device="cpu", max_model_len=8192)
        ids, answer = passkey_prompt(llm.tokenizer, 2048, 0.5, seed=3)
        prompt = llm.tokenizer.decode(ids, skip_special_tokens=False)
        done = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True))
        expected = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
        assert done.choices[0].text == streamed == expected
        assert answer in expected
        chat = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "What is the pass key?"}])
        assert chat.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:  # e.g. a request of a failed test still in flight: do not leave it running
            proc.kill()
            proc.wait()
