"""``qwen1m serve`` checks its port before it loads the model: a port in use is one sentence and a
non-zero exit, not a traceback after minutes of loading weights."""

from __future__ import annotations

import socket

import pytest

from qwen1m.cli import main

pytest.importorskip("uvicorn")


def test_a_port_in_use_fails_before_the_model_loads(tmp_path, capsys):
    missing = tmp_path / "no_such_model"  # loading it would fail with a different error: it never starts
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["serve", "--model", str(missing), "--host", "127.0.0.1", "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err == (f"error: port {port} on 127.0.0.1 is already in use; stop the process that holds it or "
                   "choose another with --port.")


def test_a_free_port_goes_on_to_load_the_model(tmp_path, capsys):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["serve", "--model", str(tmp_path / "no_such_model"), "--port", str(port)])
    err = capsys.readouterr().err
    assert code != 0 and "no_such_model" in err and "in use" not in err  # it got as far as the model


def test_a_host_that_cannot_be_bound_is_one_sentence(tmp_path, capsys):
    code = main(["serve", "--model", str(tmp_path / "m"), "--host", "203.0.113.7", "--port", "8000"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("error: cannot bind port 8000 on 203.0.113.7") and err.count("\n") == 0
