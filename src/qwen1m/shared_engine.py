"""One LLMEngine shared by every thread that calls an ``LLM``, and the streams of its generate calls.

The engine is not thread-safe, and its steps advance every queued request at once: a thread that
stepped it for its own requests used to swallow the outputs of another thread's, which then waited
forever (two threads calling ``generate`` both spun at 100% CPU). Here every use of the engine
holds one lock, and each step's outputs are routed to the stream that owns their request:

    generate() --submit (all prompts, under the lock)--> engine
    OutputStream.__next__: its inbox empty -> pump: lock, engine.step(), route outputs + progress
                           to the inboxes of their owners (any stream of any thread), unlock

So concurrent calls interleave through the engine (they batch together, as in the server) and
none waits on another's request. A stream that is closed, dropped or never started aborts its
unfinished requests: nothing it queued is computed by a later call.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator

import torch

from qwen1m.engine.llm_engine import LLMEngine
from qwen1m.outputs import PrefillProgress, RequestOutput
from qwen1m.sampling_params import SamplingParams


class SharedEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        # not reentrant: a stream finalised by the garbage collector in the middle of a step (same
        # thread, lock held) must not touch the engine then; its aborts wait in _dropped instead
        self._lock = threading.Lock()
        # request id -> the stream that returns its outputs; weak, so that a stream nobody holds is
        # collected, and its finaliser aborts what it queued
        self._owners: dict[str, weakref.ref[OutputStream]] = {}
        self._dropped: deque[str] = deque()  # request ids to abort at the next locked section

    @contextlib.contextmanager
    def locked(self) -> Iterator[LLMEngine]:
        """The engine, for the calling thread alone (and on its device: CUDA's current device is per thread)."""
        with self._lock:
            self._abort_dropped()
            device = self.engine.device
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                yield self.engine

    def submit(self, prompts: list[tuple[str | None, list[int]]], params: list[SamplingParams],
               progress: Callable[[PrefillProgress], None] | None) -> OutputStream:
        """Queue every (text, ids) prompt (checked already) and return the stream of their outputs."""
        with self.locked() as engine:
            ids: list[str] = []
            try:
                for (text, token_ids), sp in zip(prompts, params):
                    ids.append(engine.add_request(text if text is not None else token_ids, sp,
                                                  prompt_token_ids=token_ids))
            except BaseException:  # all or nothing
                for rid in ids:
                    engine.abort_request(rid)
                raise
            stream = OutputStream(self, ids, progress)
            for rid in ids:
                self._owners[rid] = weakref.ref(stream)
            return stream

    def pump(self, stream: OutputStream) -> None:
        """Run one engine step unless ``stream`` has outputs waiting (another thread's step may have
        delivered them while this one waited for the lock), and deliver what it produces."""
        with self.locked() as engine:
            if stream.inbox or not stream.pending:
                return
            outputs = engine.step()
            for p in engine.prefill_progress():
                owner = self._owner(p.request_id)
                if owner is not None and owner.progress is not None:
                    owner.inbox.append(p)
            for out in outputs:
                owner = self._owner(out.request_id)
                if owner is not None:
                    owner.inbox.append(out)
                    if out.finished:
                        del self._owners[out.request_id]

    def _owner(self, request_id: str) -> OutputStream | None:
        ref = self._owners.get(request_id)
        return None if ref is None else ref()

    def abort(self, request_ids: list[str]) -> None:
        """Abort now if the engine is free, else at the next locked section (see ``_lock``)."""
        for rid in request_ids:
            self._owners.pop(rid, None)
        if self._lock.acquire(blocking=False):
            try:
                for rid in request_ids:
                    self.engine.abort_request(rid)
            finally:
                self._lock.release()
        else:
            self._dropped.extend(request_ids)

    def _abort_dropped(self) -> None:
        while self._dropped:
            self.engine.abort_request(self._dropped.popleft())


class OutputStream:
    """The RequestOutputs of one generate call, one per step that changed a request, in step order."""

    def __init__(self, shared: SharedEngine, request_ids: list[str],
                 progress: Callable[[PrefillProgress], None] | None) -> None:
        self.request_ids = request_ids
        self.pending = set(request_ids)
        self.progress = progress
        self.inbox: deque[RequestOutput | PrefillProgress] = deque()
        self._shared: SharedEngine | None = shared

    def __iter__(self) -> OutputStream:
        return self

    def __next__(self) -> RequestOutput:
        try:
            while True:
                while self.inbox:
                    item = self.inbox.popleft()
                    if isinstance(item, PrefillProgress):
                        self.progress(item)
                        continue
                    if item.finished:
                        self.pending.discard(item.request_id)
                    return item
                if not self.pending or self._shared is None:
                    raise StopIteration
                self._shared.pump(self)
        except StopIteration:
            self.close()
            raise
        except BaseException:  # a failed step or a failing progress callback: nothing left behind
            self.close()
            raise

    def close(self) -> None:
        """Abort the requests that have not finished; the stream then ends. Idempotent."""
        shared, self._shared = self._shared, None
        if shared is not None and self.pending:
            shared.abort(sorted(self.pending))
        self.pending.clear()
        self.inbox.clear()

    def __del__(self) -> None:  # dropped without being exhausted or closed (or never started)
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the engine may be half torn down
            pass
