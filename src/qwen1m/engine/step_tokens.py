"""A launched step and how its tokens reach the host.

When every sampling row's token can be chosen on the device (``sampler.on_device``: greedy, or sampled
without penalties or logits processors), ``choose_on_device`` enqueues that choice, the rows' logprobs
and a copy of the tokens to pinned host memory right after the forward, so the engine can launch the
next decode from the device tokens before the host has seen them (``LLMEngine.step``). Otherwise the
logits stay with the step and ``read_tokens`` samples them on the host once they are ready.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwen1m.engine import logprobs as lp
from qwen1m.engine.sampler import no_finite_logit, on_device, sample_batch, sample_on_device
from qwen1m.engine.sequence import Sequence


@dataclass(slots=True)
class LaunchedStep:
    """A step whose work is enqueued: the sequences of its sampling rows, in row order, and how to
    get their tokens (host sampling from logits, or the device choice copied to host memory)."""

    samplers: list[Sequence]
    logits: torch.Tensor | None
    prefilled: list[Sequence]  # sequences that computed prompt tokens in it (prefill_progress)
    tokens: torch.Tensor | None = None  # [rows] device tokens when every row is chosen there
    logprobs: lp.LogprobRows | None = None  # with tokens: the rows that asked for logprobs (host copies)
    tokens_host: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # recorded after the copy to tokens_host
    inputs_from: dict[int, int] = field(default_factory=dict)  # overlapped: id(seq) -> row of the step before


def choose_on_device(step: LaunchedStep) -> None:
    """If every row's token can be chosen on the device, enqueue that choice (``step.tokens``), the
    logprobs asked for and the copy to ``step.tokens_host``, and drop the logits (an overlapped step may
    overwrite a graph's logits); otherwise leave the logits for ``read_tokens``."""
    samplers, logits = step.samplers, step.logits
    if not samplers or not all(on_device(seq.params) for seq in samplers):
        return
    if all(seq.params.plain_greedy for seq in samplers):
        step.tokens = report = logits.argmax(-1)
    else:  # sampled rows chosen on the device too, so the next decode can be launched ahead
        step.tokens, report = sample_on_device(logits, samplers)
    asked = [i for i, seq in enumerate(samplers) if seq.params.logprobs is not None]
    if asked:  # from the logits now: an overlapped step may overwrite a graph's logits
        rows = lp.compute(logits, asked, [samplers[i].params.logprobs for i in asked], step.tokens[asked])
        step.logprobs = rows.to_host(pinned=step.tokens.is_cuda)
    if step.tokens.is_cuda:  # to pinned host memory, without waiting; read_tokens waits
        step.tokens_host = torch.empty(len(samplers), dtype=torch.long, pin_memory=True)
        step.tokens_host.copy_(report, non_blocking=True)
        step.ready = torch.cuda.Event()
        step.ready.record()
    else:
        step.tokens_host = report
    step.logits = None


def read_tokens(step: LaunchedStep, token_text: Callable[[int], str | None]
                ) -> tuple[list[int | Exception], dict[int, dict]]:
    """Wait for the step's tokens: one per row (or the exception of a row that could not be sampled),
    and row -> {token id: Logprob} for the rows that asked for logprobs. A step whose tokens were not
    chosen on the device is sampled on the host (``sampler.sample_batch``: plain greedy rows in one
    argmax and one device->host copy for the batch; a row that raises leaves the others unaffected)."""
    if step.tokens_host is not None:
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.tokens_host.tolist()
        # (a row reported -1 had no finite logit: it fails, its logprob entry is never read)
        logprobs = _logprob_dicts(step.logprobs, [max(t, 0) for t in tokens], token_text)
        return [t if t >= 0 else no_finite_logit() for t in tokens], logprobs
    tokens = sample_batch(step.logits, step.samplers)
    return tokens, _sampled_logprobs(step.samplers, step.logits, tokens, token_text)


def _sampled_logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: list[int | Exception],
                      token_text: Callable[[int], str | None]) -> dict[int, dict]:
    """Row -> {token id: Logprob} for the rows that asked for logprobs and got a token."""
    asked = [i for i, seq in enumerate(seqs) if seq.logprobs is not None and isinstance(tokens[i], int)]
    if not asked:
        return {}
    rows = lp.compute(logits, asked, [seqs[i].params.logprobs for i in asked],
                      torch.tensor([tokens[i] for i in asked], device=logits.device))
    return _logprob_dicts(rows, tokens, token_text)


def _logprob_dicts(rows: lp.LogprobRows | None, tokens: list, token_text) -> dict[int, dict]:
    if rows is None:
        return {}
    return dict(zip(rows.rows, lp.to_dicts(rows, [tokens[i] for i in rows.rows], token_text)))
