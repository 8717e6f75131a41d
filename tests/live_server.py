"""A live qwen1m server on loopback inside the test process (test helper).

``running(app)`` serves a FastAPI app with uvicorn in a thread (our ``runner.Server``, so engine-death
exits behave as under ``qwen1m serve``) and yields the server and its base URL; ``text_checkpoint``
writes a tiny random model with a real tokenizer.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from checkpoints import save_tiny_checkpoint
from tokenizer_utils import make_tokenizer_folder

CHATML = (Path(__file__).parent / "fixtures" / "chatml_template.jinja").read_text()
TIMEOUT = 30.0  # hang guard for every wait: each returns as soon as its condition holds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text_checkpoint(folder: Path, seed: int = 31) -> Path:
    from qwen1m.tokenizer import Tokenizer

    make_tokenizer_folder(folder, CHATML)
    save_tiny_checkpoint(folder, seed=seed, vocab_size=Tokenizer.from_folder(folder).vocab_size)
    return folder


@contextlib.contextmanager
def running(build, grace_s: float = 5.0):
    """build(server) -> app (it may pass ``server.engine_died`` as on_death); yields (server, url)."""
    import uvicorn

    from qwen1m.server.runner import Server

    port = free_port()
    config = uvicorn.Config(None, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=grace_s)
    server = Server(config)
    config.app = build(server)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def assert_error(response, status: int, *words: str) -> dict:
    """An OpenAI-shaped JSON error with this status whose message holds each of ``words``."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return error


def assert_serving(url: str) -> None:
    """A normal completion still succeeds (after a bad request, say)."""
    import httpx

    out = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0,
                                                   "ignore_eos": True}, timeout=TIMEOUT)
    assert out.status_code == 200 and out.json()["choices"][0]["finish_reason"] == "length", out.text
