"""Tensor parallelism however the user starts Python: a script file without a main guard, stdin,
``python -c`` and a Jupyter kernel. Workers are ``python -m qwen1m.parallel.worker`` processes, so
none of them imports the caller's ``__main__``: the driver's top level runs exactly once (a marker
file counts it) and the tokens equal TP=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_checkpoint

import qwen1m
from qwen1m import LLM, SamplingParams

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
# the driver's code: its top level appends one line to MARKER each time it runs
DRIVER = """\
import json
from pathlib import Path
with Path({marker!r}).open("a") as f:
    f.write("top level ran\\n")
from qwen1m import LLM, SamplingParams
llm = LLM({ckpt!r}, tensor_parallel_size=2, dtype="float32", device="cpu", max_model_len=64)
out = llm.generate([{prompt!r}], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
print("TOKENS", json.dumps(out[0].outputs[0].token_ids))
llm.shutdown()
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tp_launch"), seed=5)


@pytest.fixture(scope="module")
def expected(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=64)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    return out[0].outputs[0].token_ids


def _check(stdout: str, marker: Path, expected: list[int]) -> None:
    lines = [line for line in stdout.splitlines() if line.startswith("TOKENS ")]
    assert len(lines) == 1, stdout[-2000:]
    assert json.loads(lines[0].removeprefix("TOKENS ")) == expected
    assert marker.read_text().count("top level ran") == 1  # the workers did not re-run the caller's code


def _source_env() -> dict[str, str]:
    """The driver subprocesses import the qwen1m under test without PYTHONPATH (the code inserts its
    path into sys.path at run time), so the workers find it only through the driver's sys.path."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def _driver(tmp_path: Path, ckpt: Path) -> tuple[str, Path]:
    marker = tmp_path / "marker.txt"
    prelude = f"import sys\nsys.path.insert(0, {str(Path(qwen1m.__file__).parents[1])!r})\n"
    return prelude + DRIVER.format(marker=str(marker), ckpt=str(ckpt), prompt=PROMPT), marker


@pytest.mark.parametrize("how", ["file", "stdin", "dash_c"])
def test_tp_from_any_kind_of_main(ckpt, expected, tmp_path, how):
    code, marker = _driver(tmp_path, ckpt)
    if how == "file":  # a script with no `if __name__ == "__main__":` guard
        script = tmp_path / "run.py"
        script.write_text(code)
        args, stdin = [str(script)], None
    elif how == "stdin":  # python - <<EOF
        args, stdin = ["-"], code
    else:
        args, stdin = ["-c", code], None
    proc = subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=180,
                          env=_source_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(proc.stdout, marker, expected)


def test_tp_from_a_jupyter_kernel(ckpt, expected, tmp_path):
    """A real ipykernel (as a notebook runs it): its __main__ is the interactive namespace."""
    pytest.importorskip("ipykernel")
    manager_mod = pytest.importorskip("jupyter_client.manager")
    code, marker = _driver(tmp_path, ckpt)
    km, kc = manager_mod.start_new_kernel(kernel_name="python3", env=_source_env(), cwd=str(tmp_path),
                                          startup_timeout=120)
    try:
        stdout, errors = [], []

        def collect(msg):
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                stdout.append(content["text"])
            elif kind == "error":
                errors.append("\n".join(content["traceback"]))

        reply = kc.execute_interactive(code, timeout=180, output_hook=collect)
        assert reply["content"]["status"] == "ok", "".join(errors)[-3000:]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    _check("".join(stdout), marker, expected)


def test_workers_inherit_the_drivers_import_path(monkeypatch, tmp_path):
    from qwen1m.parallel.worker import child_env

    extra = tmp_path / "added_at_runtime"
    extra.mkdir()
    monkeypatch.setattr(sys, "path", [str(extra), *sys.path])
    monkeypatch.setenv("PYTHONPATH", "/from/the/environment")
    parts = child_env()["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(extra) and parts[-1] == "/from/the/environment"
    assert str(Path(torch.__file__).parents[1]) in parts


def test_a_worker_leaves_when_the_driver_is_gone(capfd):
    """A worker waiting for rank 0 (here: in the rendezvous, which no rank 0 will ever join) exits
    once its stdin closes, as the OS closes it when the driver dies, even by SIGKILL; it would
    otherwise wait out the 30-minute collective timeout."""
    import logging
    import time

    from qwen1m.parallel.placement import Placement
    from qwen1m.parallel.runtime import free_port
    from qwen1m.parallel.worker import WorkerProcess, WorkerSpec

    proc = WorkerProcess(WorkerSpec(1, 2, f"tcp://127.0.0.1:{free_port()}", Placement(("cpu", "cpu"), "gloo"),
                                    None, logging.DEBUG))
    log, deadline = "", time.monotonic() + 120
    while "joining the process group" not in log and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
        log += capfd.readouterr().err  # the worker writes to our stderr (fd 2, inherited)
    time.sleep(0.5)  # now inside init_process_group, waiting for rank 0
    assert proc.is_alive() and proc.status() is None, log
    proc.release()
    proc.join(timeout=60)  # a hang guard: it leaves as soon as it sees EOF
    assert proc.exitcode == 1
    assert "the driver is gone; exiting" in log + capfd.readouterr().err
