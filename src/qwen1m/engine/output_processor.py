"""What a step's tokens turn into: stop checks with incremental detokenising, and ``RequestOutput``.

Pure functions of a request's sequences; the engine (``llm_engine.py``) frees a finished sequence's
blocks and forgets a finished request.
"""

from __future__ import annotations

import time

from qwen1m.engine.sequence import Sequence
from qwen1m.outputs import CompletionOutput, RequestMetrics, RequestOutput


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
