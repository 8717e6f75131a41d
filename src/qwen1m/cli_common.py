"""What the CLI commands share: loading the model their flags describe, and progress lines.

``qwen1m.cli`` and the commands in their own modules (``cli_demo``, ``eval.cli``, ``server.cli``)
import from here, never from each other, so no CLI module imports the one that registers it. The
model flags themselves are ``EngineConfig.add_cli_args`` (``qwen1m.engine_config``). Nothing here
imports torch until a model is loaded, so ``qwen1m --help`` stays light.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from qwen1m.engine_config import EngineConfig

if TYPE_CHECKING:
    from qwen1m.llm import LLM
    from qwen1m.outputs import PrefillProgress


def load_llm(config: EngineConfig, **wiring) -> LLM:
    """The LLM of ``config`` (usually ``EngineConfig.from_cli_args(args)``); ``wiring``: the objects
    LLM takes beside its options (``recall_probe``)."""
    from qwen1m.llm import LLM

    return LLM(**config.options(), **wiring)


class ProgressWriter:
    """One progress line on ``stream``: redrawn in place with ``\\r`` on a terminal (at most 5x/s);
    elsewhere (a log file, a pipe, CI) written as whole lines, at most one per ``line_interval_s``,
    so a log holds readable lines instead of thousands of carriage returns."""

    def __init__(self, stream=None, line_interval_s: float = 10.0, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval = 0.2 if self.tty else line_interval_s
        self.clock = clock
        self.last: float | None = None

    def write(self, text: str, finished: bool = False) -> None:
        now = self.clock()
        if not finished and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        if self.tty:
            self.stream.write(f"\r{text}   " + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def progress_printer(step_tokens: int, stream=None) -> Callable[[PrefillProgress], None]:
    """A prefill progress bar on stderr for prompts that take more than one engine step."""
    writer = ProgressWriter(stream)

    def show(p: PrefillProgress) -> None:
        if p.total <= step_tokens:
            return
        width = 30
        filled = int(width * p.done / p.total)
        eta = f"ETA {p.eta_s:,.0f} s" if p.eta_s is not None and not p.finished else "done"
        writer.write(f"prefill [{'#' * filled}{'.' * (width - filled)}] {p.done:,}/{p.total:,} tokens "
                     f"{p.tokens_per_s:,.0f} tok/s {eta}", p.finished)

    return show
