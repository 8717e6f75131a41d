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
from tokenizer_utils import make_tokenizer_folder

from qwen1m.cli import build_parser

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

CHATML = (Path(__file__).parents[1] / "fixtures" / "chatml_template.jinja").read_text()


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "--model", "somewhere"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_completion(url: str, max_tokens: int, started: threading.Event, result: dict) -> None:
    body = {"prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, finish, done = "", None, False
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer k"}) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
                    started.set()
    except httpx.HTTPError as e:  # the server cut the connection
        result["error"] = type(e).__name__
    result.update(text=text, finish=finish, done=done)
    started.set()


def test_sigterm_finishes_short_requests_and_cancels_long_ones(tmp_path):
    from qwen1m.tokenizer import Tokenizer

    make_tokenizer_folder(tmp_path, CHATML)
    save_tiny_checkpoint(tmp_path, seed=41, vocab_size=Tokenizer.from_folder(tmp_path).vocab_size)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "qwen1m.cli", "serve", "--model", str(tmp_path), "--dtype", "float32",
           "--device", "cpu", "--max-model-len", "4096", "--port", str(port), "--api-key", "k",
           "--shutdown-timeout", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "QWEN1M_API_KEY": ""})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "qwen1m serve did not start within 60 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == tmp_path.name

        short, long = {}, {}
        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=stream_completion, args=(url, 8, started[0], short)),
                   threading.Thread(target=stream_completion, args=(url, 4000, started[1], long))]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn re-raises the signal once it has shut down, so supervisors see a SIGTERM exit
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert short["done"] and short["finish"] == "length", short  # finished within the grace period
    assert not long["done"] and long["finish"] is None, long  # cut off when the grace period ended
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
        proc.wait(timeout=30)
