"""What a step's tokens turn into: stop checks with incremental detokenising, and ``RequestOutput``.

``OutputProcessor`` holds the requests between ``add`` and their last output: it waits for a launched
step's tokens, appends them, runs the stop checks (``check_stop``), ends a request that failed alone
(a row that could not be sampled, a detokenizer error) and builds each request's output
(``request_output``). The scheduler frees a finished sequence's blocks.
"""

from __future__ import annotations

import functools
import logging
import time

from qwen1m.engine.scheduler import Scheduler
from qwen1m.engine.sequence import Sequence
from qwen1m.engine.step_tokens import LaunchedStep, read_tokens
from qwen1m.errors import Qwen1mError
from qwen1m.outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)


class OutputProcessor:
    """The requests in flight and how a step's tokens become their outputs."""

    def __init__(self, tokenizer, eos_ids: set[int], scheduler: Scheduler):
        self.eos_ids = eos_ids
        self.scheduler = scheduler  # finish / abort free the sequences' blocks
        self.requests: dict[str, list[Sequence]] = {}
        # each request's prompt ids, copied once: a RequestOutput per step must not copy a 1M-token
        # prompt out of a sequence's token list (4 ms per decode step on one CPU core)
        self._prompt_ids: dict[str, list[int]] = {}
        self._failed: list[RequestOutput] = []  # requests ended by their own error, for the next outputs
        # a token's text alone, for logprobs (cached: the same few thousand tokens come up again)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(
            (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer is not None else (lambda t: None))

    def add(self, request_id: str, seqs: list[Sequence], num_prompt_tokens: int) -> None:
        self.requests[request_id] = seqs
        self._prompt_ids[request_id] = seqs[0].token_ids[:num_prompt_tokens]

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self._prompt_ids.pop(request_id, None)

    def process(self, launched: LaunchedStep, placeholders: dict[int, int]) -> list[RequestOutput]:
        """Wait for a step's tokens, append them (or put them in place of the placeholders an
        overlapped launch appended), run the stop checks and build the outputs (failed requests first)."""
        samplers = launched.samplers
        if not samplers:
            return self.take_failed()
        tokens, logprobs = read_tokens(launched, self.token_text)
        touched: dict[str, None] = {}
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(samplers, tokens)):
            if seq.is_finished:  # finished (or aborted) after this step was launched: drop its row
                continue
            if isinstance(token, Exception):  # this row could not be sampled: its request fails alone
                self.fail_request(seq.request_id, token)
                continue
            if id(seq) in placeholders:
                seq.token_ids[-1] = token
            else:
                seq.token_ids.append(token)
            if seq.logprobs is not None:
                entry = logprobs[i]
                seq.logprobs.append(entry)
                seq.cumulative_logprob += entry[token].logprob
            if seq.first_token_time is None:
                seq.first_token_time = now
            try:
                if check_stop(seq, token, self.eos_ids):
                    self.scheduler.finish(seq)
            except Exception as e:  # e.g. detokenizing: one request's failure, not the batch's
                self.fail_request(seq.request_id, e)
                continue
            touched[seq.request_id] = None
        return self.take_failed() + [self._request_output(rid) for rid in touched if rid in self.requests]

    def fail_request(self, request_id: str, error: Exception) -> None:
        """End one request with an error output (its KV freed); the rest of the step goes on."""
        if request_id not in self.requests:
            return
        logger.warning("request %s failed: %s: %s", request_id, type(error).__name__, error)
        seqs = self.requests[request_id]
        self.scheduler.abort(request_id)
        for s in seqs:
            s.finish_reason = "error"
        out = self._request_output(request_id)
        out.error = str(error) if isinstance(error, Qwen1mError) else f"Internal error ({type(error).__name__})."
        self._failed.append(out)

    def take_failed(self) -> list[RequestOutput]:
        failed, self._failed = self._failed, []
        return failed

    def _request_output(self, request_id: str) -> RequestOutput:
        out = request_output(request_id, self.requests[request_id], self._prompt_ids[request_id])
        if out.finished:
            del self.requests[request_id]
            del self._prompt_ids[request_id]
        return out


def check_stop(seq: Sequence, token: int, eos_ids) -> bool:
    """Append ``token``'s text and decide whether ``seq`` ends here (eos, a stop token or string, or
    its length limit); sets the finish reason and returns True when it does."""
    params = seq.params
    if seq.detokenizer is not None:  # incremental: a few tokens decoded per step, not the whole output
        seq.output_text += seq.detokenizer.add(token)
    reason, stop = None, None
    if not params.ignore_eos and token in eos_ids:
        reason, stop = "stop", None
    elif params.stop_token_ids and token in params.stop_token_ids:
        reason, stop = "stop", token
    elif params.stop_strings:
        for s in params.stop_strings:
            at = seq.output_text.find(s, max(0, seq.emitted_text_len - len(s)))
            if at >= 0:
                end = at + len(s) if params.include_stop_str_in_output else at
                seq.output_text = seq.output_text[:end]
                reason, stop = "stop", s
                break
    if reason is None and seq.num_tokens >= seq.max_len:
        reason = "length"
    if reason is None:
        return False
    seq.finish_reason, seq.stop_reason = reason, stop
    seq.finished_time = time.monotonic()
    if not isinstance(stop, str) and seq.detokenizer is not None:
        seq.output_text += seq.detokenizer.flush()  # final: nothing will complete a held-back character
    return True


def request_output(request_id: str, seqs: list[Sequence], prompt_ids: list[int]) -> RequestOutput:
    """The request's output so far; text that could still start a stop string is held back."""
    finished = all(s.is_finished for s in seqs)
    new_text = []
    for s in seqs:
        visible = len(s.output_text)
        if not s.is_finished and s.params.stop_strings:
            visible = max(s.emitted_text_len, visible - (max(map(len, s.params.stop_strings)) - 1))
        new_text.append(s.output_text[s.emitted_text_len:visible])
        s.emitted_text_len = visible
    first = seqs[0]
    ttft = [s.first_token_time for s in seqs if s.first_token_time is not None]
    return RequestOutput(
        request_id=request_id,
        prompt=first.prompt,
        prompt_token_ids=prompt_ids,
        outputs=[CompletionOutput(s.index, s.output_text, s.output_token_ids, s.finish_reason, s.stop_reason,
                                  None if s.logprobs is None else list(s.logprobs),
                                  None if s.logprobs is None else s.cumulative_logprob)
                 for s in seqs],
        finished=finished,
        metrics=RequestMetrics(first.arrival_time, min(ttft) if ttft else None,
                               max((s.finished_time or 0.0) for s in seqs) if finished else None),
        new_text=new_text,
        num_cached_tokens=first.num_cached_tokens,
        prompt_logprobs=None if first.prompt_logprobs is None else list(first.prompt_logprobs),
    )
