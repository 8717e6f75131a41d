"""One thread owns the LLMEngine; asyncio handlers reach it only through two queues.

    handler --_Submit/_Abort--> queue.Queue --> engine thread: drain commands, engine.step(), deliver
    handler <--RequestOutput | error-- asyncio.Queue (one per HTTP request) <-- loop.call_soon_threadsafe

The engine is not thread-safe, so no other thread calls it: requests, aborts and the metrics
gauges all go through this loop. Every engine step runs all scheduled requests together, so
requests that arrive mid-generation join the next step (continuous batching) and requests beyond
the engine's capacity wait in its scheduler queue.

Isolation. A request that fails while it is added or generated (its own error) fails alone; a step
that fails as a whole (the device) fails the requests in it and the loop goes on. If the loop itself
dies, ``on_death`` is called so that the server exits non-zero and a supervisor restarts it: no
half-dead process answering 503 forever.

Bounds. The inbox holds at most one command per admitted HTTP request and one abort per stream
(the server refuses work past ``--max-queued-requests`` before it gets here), and a stream keeps
only the newest output of each of its engine requests (outputs are cumulative), so a client that
reads slowly costs one output per prompt, not one per step.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qwen1m.cache.kv_tiers import TierStats
from qwen1m.engine.llm_engine import LLMEngine
from qwen1m.errors import Qwen1mError
from qwen1m.outputs import RequestOutput
from qwen1m.sampling_params import SamplingParams
from qwen1m.server.limits import Ticket
from qwen1m.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineUnavailable(Exception):
    """The engine stopped (shutdown) or failed; the message says which and what happened to the request."""

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


_ACCEPTED = object()  # first item of a RequestStream when the engine took all its requests


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt), in step order; only the
    newest output of each is kept until the reader takes it."""

    def __init__(self, engine_loop: EngineLoop, request_ids: list[str], ticket: Ticket | None = None):
        self._engine_loop = engine_loop
        self._ticket = ticket  # its place in the server's queue: given up at the first output or the end
        self._loop = asyncio.get_running_loop()
        self._latest: dict[str, RequestOutput] = {}  # request id -> its newest unread output
        self._control: collections.deque = collections.deque()  # _ACCEPTED and exceptions, read first
        self._ready = asyncio.Event()
        self.request_ids = request_ids
        self.unfinished = set(request_ids)

    def put(self, item: object) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the event loop already closed: nobody is waiting
            pass

    def _deliver(self, item: object) -> None:
        if item is not _ACCEPTED and self._ticket is not None:
            self._ticket.release()
        if isinstance(item, RequestOutput):
            self._latest[item.request_id] = item  # replaces an unread one: the new one carries all of it
        else:
            self._control.append(item)
        self._ready.set()

    async def _get(self) -> object:
        while not self._control and not self._latest:
            self._ready.clear()
            await self._ready.wait()
        if self._control:
            item = self._control.popleft()
            if isinstance(item, BaseException):
                self.unfinished.clear()  # the engine thread already dropped these requests
                raise item
            return item
        return self._latest.pop(next(iter(self._latest)))

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.unfinished:
            raise StopAsyncIteration
        out = await self._get()
        if out.finished:
            self.unfinished.discard(out.request_id)
        return out

    def close(self) -> None:
        """Cancel whatever has not finished and free its KV cache; safe to call twice."""
        self._engine_loop.streams.discard(self)
        if self._ticket is not None:
            self._ticket.release()
        if self.unfinished:
            self._engine_loop.abort(sorted(self.unfinished))
            self.unfinished.clear()

    def interrupt(self, error: Exception) -> None:
        """Cancel the requests and make the waiting reader raise ``error`` (event-loop thread only)."""
        self.close()
        self._deliver(error)


@dataclass(slots=True)
class _Submit:
    requests: list[EngineRequest]
    stream: RequestStream


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


@dataclass(slots=True)
class _Tracked:
    stream: RequestStream
    arrival: float
    num_generated: int = 0
    last_token_time: float | None = None


_STOP = object()


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, on_death: Callable[[str], None] | None = None):
        self.engine = engine
        self.metrics = metrics
        self.on_death = on_death  # called (engine thread) with the reason when the loop dies of a bug
        self._inbox: queue.Queue = queue.Queue()  # _Submit | _Abort | _STOP, in arrival order
        self._tracked: dict[str, _Tracked] = {}  # requests in flight (engine thread only)
        self._thread: threading.Thread | None = None
        self._failure: str | None = None  # why the loop died, for requests that arrive afterwards
        self.streams: set[RequestStream] = set()  # open streams (event-loop thread): shutdown ends them
        self._preemptions = 0  # the scheduler's count already added to the metrics
        self._tier_stats = TierStats()  # the prefix-cache tiers' counters already added to the metrics

    # ---- asyncio side -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qwen1m-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(self, requests: list[EngineRequest], ticket: Ticket | None = None) -> RequestStream:
        """Hand requests to the engine; raises its RequestError (a bad prompt) before any output."""
        if not self.is_alive():
            raise EngineUnavailable(self._failure or "The server is shutting down.", 503)
        stream = RequestStream(self, [r.request_id for r in requests], ticket)
        self.streams.add(stream)
        self._inbox.put(_Submit(requests, stream))
        try:
            first = await stream._get()
        except asyncio.CancelledError:  # the client left before the engine answered
            stream.close()
            raise
        except BaseException:
            self.streams.discard(stream)
            raise
        assert first is _ACCEPTED
        return stream

    def interrupt_all(self, error: Exception) -> None:
        """End every open stream with ``error`` (event-loop thread): the shutdown grace period is over."""
        for stream in list(self.streams):
            stream.interrupt(error)

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(_Abort(request_ids))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel what is still running and stop the thread (uvicorn has already drained requests)."""
        if self.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    # ---- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
                self._update_gauges()
            self._fail_all(EngineUnavailable("The server is shutting down; the request was cancelled.", 503),
                           "abort")
        except BaseException as e:  # a bug: fail loudly, but never leave a client waiting forever
            logger.exception("the engine loop stopped")
            self._failure = f"The engine stopped after an internal error ({type(e).__name__}: {e})."
            try:
                self._fail_all(EngineUnavailable(self._failure, 500), "error")
            finally:
                if self.on_death is not None:
                    self.on_death(self._failure)
        finally:
            try:
                self._update_gauges()
            except Exception:  # the engine is broken: the gauges can stay where they were
                logger.exception("could not update the gauges")

    def _drain(self, block: bool) -> bool:
        """Apply waiting commands (waiting for one if ``block``); False when asked to stop."""
        while True:
            try:
                cmd = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Submit):
                self._add(cmd)
            elif isinstance(cmd, _Abort):
                for rid in cmd.request_ids:
                    if self._tracked.pop(rid, None) is not None:
                        self.engine.abort_request(rid)
                        self.metrics.requests.inc(finish_reason="abort")

    def _add(self, cmd: _Submit) -> None:
        added = []
        try:
            for r in cmd.requests:
                self.engine.add_request(r.prompt_token_ids, r.params, r.request_id)
                added.append(r.request_id)
        except Exception as e:  # a bad request (Qwen1mError) or a bug on its account: it fails alone
            for rid in added:
                self.engine.abort_request(rid)
            if not isinstance(e, Qwen1mError):
                logger.exception("adding request %s failed", cmd.requests[0].request_id)
                e = EngineUnavailable(f"Internal error while adding the request ({type(e).__name__}).", 500)
            cmd.stream.put(e)
            return
        now = time.monotonic()
        for r in cmd.requests:
            self._tracked[r.request_id] = _Tracked(cmd.stream, now)
            self.metrics.prompt_tokens.inc(len(r.prompt_token_ids))
        cmd.stream.put(_ACCEPTED)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # e.g. out of GPU memory: fail the requests of this step, keep serving the next ones
            logger.exception("engine step failed; cancelling the %d requests in flight", len(self._tracked))
            self._fail_all(EngineUnavailable(f"The engine failed while generating ({type(e).__name__}: {e}); "
                                             "the request was cancelled.", 500), "error")
            return
        self._log_prefill()  # before the outputs go out: a client that has its answer has seen the log too
        now = time.monotonic()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:  # aborted while its step ran
                continue
            if out.error is not None:  # this request alone failed (the engine has freed it)
                self._fail_stream(tracked.stream, EngineUnavailable(
                    f"The request failed while generating: {out.error}", 500))
                continue
            n = sum(len(o.token_ids) for o in out.outputs)
            if n > tracked.num_generated:
                if tracked.last_token_time is None:
                    self.metrics.time_to_first_token.observe(now - tracked.arrival)
                    self.metrics.prefix_cache_hit_tokens.inc(out.num_cached_tokens)
                else:
                    self.metrics.inter_token_latency.observe(now - tracked.last_token_time)
                self.metrics.generation_tokens.inc(n - tracked.num_generated)
                tracked.num_generated, tracked.last_token_time = n, now
            if out.finished:  # counted before the client gets its answer: /metrics never lags behind it
                del self._tracked[out.request_id]
                self.metrics.requests.inc(finish_reason=out.outputs[0].finish_reason or "stop")
            tracked.stream.put(out)

    def _log_prefill(self) -> None:
        """One INFO line per step for each prompt that needs several steps, so a 1M-token prefill
        shows its pace; one-step prompts stay quiet."""
        for p in self.engine.prefill_progress():
            if p.total > self.engine.max_num_batched_tokens:
                eta = "" if p.eta_s is None or p.finished else f", about {p.eta_s:.0f} s left"
                logger.info("prefill %s: %d / %d tokens (%.1f%%), %.0f tokens/s%s", p.request_id, p.done, p.total,
                            100.0 * p.done / p.total, p.tokens_per_s, eta)

    def _fail_stream(self, stream: RequestStream, error: Exception) -> None:
        """Fail one HTTP request: its other engine requests (other prompts) are aborted too."""
        for rid in stream.request_ids:
            if self._tracked.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                self.metrics.requests.inc(finish_reason="error")
        stream.put(error)

    def _fail_all(self, error: Exception, reason: str) -> None:
        for rid, tracked in list(self._tracked.items()):
            self.engine.abort_request(rid)
            self.metrics.requests.inc(finish_reason=reason)
            tracked.stream.put(error)
        self._tracked.clear()

    def _update_gauges(self) -> None:
        preemptions = self.engine.scheduler.num_preemptions
        self.metrics.preemptions.inc(preemptions - self._preemptions)
        self._preemptions = preemptions
        stats = self.engine.kv.stats()
        self.metrics.add_tier_stats(stats, self._tier_stats)
        self._tier_stats = copy.deepcopy(stats)
        self.metrics.running.set(self.engine.num_running())
        self.metrics.waiting.set(self.engine.num_waiting())
        self.metrics.kv_cache_usage.set(self.engine.kv_cache_usage())
