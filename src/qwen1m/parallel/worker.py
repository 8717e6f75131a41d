"""A tensor-parallel worker process: ``python -m qwen1m.parallel.worker <status fd>``.

Ranks 1..N-1 are fresh interpreters started with ``-m``, not multiprocessing's "spawn": spawn
re-imports the caller's ``__main__`` in every child, which fails when the driver's code came from
stdin, ``python -c`` or a notebook cell, and re-runs the whole top level of a script without an
``if __name__ == "__main__":`` guard. A worker here imports qwen1m and nothing of the caller.

    driver --stdin-------> [8-byte little-endian length][pickled WorkerSpec], then stdin stays open:
                           EOF on it means the driver is gone, and the worker exits
    driver <--status fd--- one JSON line: {"ready": true} or {"error": "<one sentence>"}
    driver <-> workers     torch.distributed (gloo or NCCL) for the steps (runtime.worker_loop)

The child's PYTHONPATH starts with the driver's ``sys.path``, so it imports the same qwen1m as the
driver, whether installed, a source checkout on PYTHONPATH or a path a notebook appended at runtime.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import BinaryIO

from qwen1m.parallel.placement import Placement

logger = logging.getLogger(__name__)

_LENGTH_BYTES = 8


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    rank: int
    size: int
    init_method: str  # tcp://host:port of rank 0's rendezvous
    placement: Placement
    build: object  # engine.builder.BuildSpec (not imported here: the driver side stays light)
    log_level: int  # the driver's qwen1m log level, so the workers log what the driver would


def child_env() -> dict[str, str]:
    """The driver's environment, with its import path in front of PYTHONPATH."""
    env = dict(os.environ)
    paths = [os.path.abspath(p) for p in sys.path if p and os.pathsep not in p and os.path.exists(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class WorkerProcess:
    """The driver's handle on one worker process (the subset of multiprocessing.Process it uses)."""

    def __init__(self, spec: WorkerSpec) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "qwen1m.parallel.worker", str(write_fd)],
                                          stdin=subprocess.PIPE, pass_fds=(write_fd,), env=child_env())
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child holds its own copy: EOF on read_fd once it exits
        os.set_blocking(read_fd, False)
        self._status_fd: int | None = read_fd
        self._buffer = b""
        payload = pickle.dumps(spec)
        try:
            self._proc.stdin.write(len(payload).to_bytes(_LENGTH_BYTES, "little") + payload)
            self._proc.stdin.flush()
        except BrokenPipeError:  # it died at once (e.g. qwen1m not importable): is_alive() says so
            pass
        self.rank = spec.rank

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll()

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def status(self) -> dict | None:
        """The worker's status line once it has written one (non-blocking), else None."""
        if self._status_fd is not None:
            try:
                while chunk := os.read(self._status_fd, 4096):
                    self._buffer += chunk
            except BlockingIOError:
                pass
        line, sep, _ = self._buffer.partition(b"\n")
        return json.loads(line) if sep else None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        self._proc.terminate()

    def release(self) -> None:
        """Close the pipes (stdin's EOF tells a worker still running that the driver is gone)."""
        for close in (self._proc.stdin.close, lambda: os.close(self._status_fd)):
            try:
                close()
            except (OSError, TypeError, ValueError):
                pass
        self._status_fd = None


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError("the driver closed the pipe before sending the worker's spec")
        data += chunk
    return data


def _watch_driver(stdin: BinaryIO, rank: int) -> None:
    """Leave when the driver's end of stdin closes: a driver killed outright cannot stop us with a
    message, and a worker left waiting in a collective would hold its GPU for the 30-minute timeout."""
    while stdin.read(65536):
        pass
    logger.warning("tensor-parallel worker rank %d: the driver is gone; exiting", rank)
    os._exit(1)


def _run(spec: WorkerSpec, report) -> int:
    import torch.distributed as dist

    from qwen1m.engine.builder import build_rank
    from qwen1m.errors import Qwen1mError
    from qwen1m.model.shard import TPShard
    from qwen1m.parallel import runtime

    device = spec.placement.device(spec.rank)
    try:
        logger.debug("joining the process group at %s on %s", spec.init_method, device)
        runtime.init_group(spec.rank, spec.size, spec.init_method, device, spec.placement.backend)
        parts = build_rank(spec.build, TPShard(spec.rank, spec.size), device, share=spec.placement.share(spec.rank),
                           wiring=runtime.rank_wiring(None))
        report({"ready": True})
        runtime.worker_loop(parts.model, parts.kv_cache, device)
        status = 0
    except Qwen1mError as e:
        report({"error": str(e)})
        status = 1
    except BaseException as e:  # surfaced to the driver as one sentence; the traceback goes to the log
        logger.exception("tensor-parallel worker rank %d failed", spec.rank)
        report({"error": f"{type(e).__name__}: {e}"})
        status = 1
    if dist.is_initialized():
        try:
            runtime.leave_group()
        except RuntimeError:  # the driver is gone: nothing to meet
            dist.destroy_process_group()
    return status


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C in a terminal reaches the whole process group: the driver decides, and stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    status_file = os.fdopen(int(argv[0]), "w", buffering=1)
    stdin = sys.stdin.buffer
    spec: WorkerSpec = pickle.loads(_read_exact(stdin, int.from_bytes(_read_exact(stdin, _LENGTH_BYTES), "little")))
    logging.basicConfig(level=spec.log_level, format=f"%(levelname)s %(name)s [tp rank {spec.rank}]: %(message)s")
    threading.Thread(target=_watch_driver, args=(stdin, spec.rank), daemon=True, name="driver-watch").start()

    def report(message: dict) -> None:
        status_file.write(json.dumps(message) + "\n")

    from qwen1m.parallel.runtime import exit_worker

    exit_worker(_run(spec, report))


if __name__ == "__main__":
    main()
