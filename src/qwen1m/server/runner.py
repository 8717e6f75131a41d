"""uvicorn's Server with qwen1m's exits: 0 after a graceful SIGTERM, 1 when the engine died.

uvicorn re-raises the signal it caught once it has shut down, so a clean SIGTERM exit reads as 143 to
a supervisor; here a drained shutdown returns 0. On the signal the app's ``drain`` is told the grace
period, so the streams still open at its end get a final error event and ``[DONE]`` before uvicorn's
own deadline cancels them with nothing. If the engine loop dies, the server stops and exits 1, so a
supervisor restarts it instead of leaving a process that answers 503 forever.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)

# the drain ends streams this long (or a quarter of the grace period, if shorter) before uvicorn's
# deadline, so that their last events get out before uvicorn cancels what is left
DRAIN_MARGIN_S = 1.0


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # not recorded in _captured_signals: uvicorn would re-raise it at the end (exit 143)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        grace = self.config.timeout_graceful_shutdown  # None: uvicorn waits for ever, so no drain either
        if not self.should_exit and self._loop is not None and grace is not None:
            self._loop.call_soon_threadsafe(self._drain, max(0.0, grace - min(DRAIN_MARGIN_S, grace / 4)))
        self.should_exit = True

    def _drain(self, delay: float) -> None:
        app = self.config.app
        drain = getattr(getattr(app, "state", None), "drain", None)
        if drain is not None:
            drain(delay)

    def engine_died(self, reason: str) -> None:
        """The app's on_death (engine thread): stop serving, exit non-zero."""
        logger.error("the engine loop died (%s); stopping the server so that it can be restarted", reason)
        self.exit_code = 1
        self.should_exit = True  # uvicorn's main loop polls this every 0.1 s
