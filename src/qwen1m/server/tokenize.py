"""Prompt tokenization in a worker process, with a length bound that needs no tokenizing.

``tokenizers``' ``encode`` holds the GIL for its whole run (~1 s per 10 MB of text), so in a thread
it still stalls the event loop (``/health``, every stream) and the engine thread. A worker process
does not: the server process only pickles the text there and the ids back. The worker imports
nothing but ``tokenizers`` (spawned, so it starts in ~0.3 s and holds no copy of the model) and is
recycled after a very long prompt so that the memory the tokenizer took is returned. Requests are
encoded one at a time, in arrival order; how many may wait is bounded by the server's queue limit.

Length bound. A token covers at most ``max_token_bytes`` bytes of text (the longest entry of the
vocabulary), so a prompt of B UTF-8 bytes has at least B / max_token_bytes tokens: one whose bound
already reaches max_model_len is refused before any tokenizing.
"""

from __future__ import annotations

import array
import asyncio
import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from qwen1m.errors import RequestError

logger = logging.getLogger(__name__)

RECYCLE_AFTER_BYTES = 64 << 20  # text encoded by one worker before it is replaced (its peak memory goes with it)

_backend = None  # the worker's tokenizers.Tokenizer


def _init_worker(tokenizer_json: str) -> None:
    import tokenizers

    global _backend
    # the server's process group gets SIGINT/SIGTERM; the server shuts this worker down itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _backend = tokenizers.Tokenizer.from_str(tokenizer_json)


def _encode(text: str) -> bytes:
    # as Tokenizer.encode; sent back as int32 bytes: unpickling a list of 2M ints held the server's
    # GIL for ~0.4 s, a bytes object is one copy
    return array.array("i", _backend.encode(text, add_special_tokens=False).ids).tobytes()


class TokenizerPool:
    def __init__(self, tokenizer, max_model_len: int):
        """tokenizer: the LLM's ``qwen1m.tokenizer.Tokenizer``."""
        self.max_model_len = max_model_len
        self._json = tokenizer.backend.to_str()
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        # byte-level BPE spells each byte as one character of at most 2 UTF-8 bytes, so this
        # over-counts a token's text bytes, which keeps the bound a true lower bound on tokens
        self.max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1)
        self._executor: ProcessPoolExecutor | None = None
        self._encoded_bytes = 0

    def start(self) -> None:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(self._json,))
            self._executor.submit(_encode, "")  # start the worker now, not on the first request

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def check_length(self, text: str, num_bytes: int) -> None:
        at_least = -(-num_bytes // self.max_token_bytes)
        if at_least >= self.max_model_len:
            raise RequestError(f"The prompt has at least {at_least} tokens ({num_bytes} bytes of text, at most "
                               f"{self.max_token_bytes} bytes per token) but max_model_len is {self.max_model_len}; "
                               "shorten the prompt.")

    async def encode(self, text: str) -> list[int]:
        num_bytes = len(text.encode("utf-8", "surrogatepass"))
        self.check_length(text, num_bytes)
        self.start()
        executor = self._executor
        try:
            packed = await asyncio.get_running_loop().run_in_executor(executor, _encode, text)
        except BrokenProcessPool:  # the worker died (killed, out of memory): a new one for the next request
            logger.error("the tokenizer worker died; starting a new one")
            self._replace(executor)
            raise RequestError("The prompt could not be tokenized (the tokenizer worker stopped); "
                               "retry, or send a shorter prompt.") from None
        self._encoded_bytes += num_bytes
        if self._encoded_bytes > RECYCLE_AFTER_BYTES:
            self._replace(executor)
        ids = array.array("i")
        ids.frombytes(packed)
        return ids.tolist()

    def _replace(self, executor: ProcessPoolExecutor) -> None:
        if self._executor is executor:  # not already replaced by a concurrent request
            self._executor, self._encoded_bytes = None, 0
            executor.shutdown(wait=False)  # a request still encoding there finishes first
            self.start()
