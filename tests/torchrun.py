"""Launching a script with torchrun from a test.

Known teardown abort: with gloo on the CPU, a rank's process sometimes aborts *after* its script has
finished (SIGABRT, "terminate called without an active exception", no Python frame on the stack:
a C++ thread of the torch.distributed runtime met in interpreter finalization; pytorch/pytorch#179291
describes the mechanism). Measured here: 1 launch in about 30, rank 0, after the script's last line.
Worker ranks avoid it by leaving with ``os._exit`` (``parallel.runtime.exit_worker``); rank 0 runs the
user's script and cannot. ``run_torchrun`` therefore relaunches once when, and only when, a launch
ended in exactly that abort after the script printed its completion marker; any other failure, or
the abort twice, fails the test."""

from __future__ import annotations

import subprocess
import sys

DONE = "TORCHRUN SCRIPT DONE"  # the script prints this as its last line
TEARDOWN_ABORT = "terminate called without an active exception"


def run_torchrun(script, args_for=lambda attempt: [], env=None, timeout: float = 240) -> int:
    """Run ``script`` on two ranks with ``args_for(attempt)`` as its arguments; returns the attempt that
    exited 0 (0, or 1 after the known teardown abort: a test whose first launch leaves state behind
    gives each attempt its own folder)."""
    from qwen1m.parallel.runtime import free_port

    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", str(script), *map(str, args_for(attempt))],
                              capture_output=True, text=True, timeout=timeout, env=env)
        finished = DONE in proc.stdout
        assert finished or proc.returncode != 0, "the script exited 0 without printing its completion marker"
        if proc.returncode == 0:
            return attempt
        if attempt or not (finished and TEARDOWN_ABORT in proc.stderr and "SIGABRT" in proc.stderr):
            raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    raise AssertionError("unreachable")
