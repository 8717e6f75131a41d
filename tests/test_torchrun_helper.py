"""tests/torchrun.py relaunches only after the known teardown abort, once; everything else fails."""

from __future__ import annotations

import subprocess

import pytest
import torchrun

ABORT = (-6, torchrun.DONE, "terminate called without an active exception\n... Signal 6 (SIGABRT) received")
OK = (0, torchrun.DONE, "")


@pytest.mark.parametrize("outcomes, want", [
    pytest.param([OK], 0, id="clean-exit"),
    pytest.param([ABORT, OK], 1, id="teardown-abort-then-clean"),
    pytest.param([ABORT, ABORT], None, id="teardown-abort-twice"),
    pytest.param([(1, "", "Traceback ...")], None, id="script-error"),
    pytest.param([(-6, "", "terminate called without an active exception SIGABRT")], None,
                 id="abort-before-the-script-finished"),
    pytest.param([(-6, torchrun.DONE, "Segmentation fault")], None, id="another-crash-after-finishing"),
    pytest.param([(0, "", "")], None, id="exit-0-without-the-marker"),
])
def test_relaunches_only_after_the_known_teardown_abort(monkeypatch, outcomes, want):
    results = iter(outcomes)

    def run(args, **kw):
        rc, out, err = next(results)
        return subprocess.CompletedProcess(args, rc, out, err)

    monkeypatch.setattr(torchrun.subprocess, "run", run)
    if want is None:
        with pytest.raises(AssertionError):
            torchrun.run_torchrun("script.py")
    else:
        assert torchrun.run_torchrun("script.py") == want
