"""Logprobs of chosen tokens and the top-k, from the model's raw logits.

vLLM (v1, its default ``logprobs_mode="raw_logprobs"``) reports ``log_softmax`` of the logits the
model produced, before logits processors, logit_bias, penalties, temperature or top-k/top-p: the
numbers say what the model thinks, whatever the sampler then did with them. We do the same. Each
position becomes ``{token id: Logprob}``: the chosen token first (with its rank, 1 + the number of
tokens more likely), then the ``k`` most likely tokens by rank (the chosen token once if it is
among them).

Generated tokens: ``compute`` runs on the device in the step (for an all-greedy step, before the
next overlapped step is launched, with the copy to the host ordered before the step's event), and
``to_dicts`` builds the records on the host. Prompt tokens: position p's logits score prompt token
p + 1, computed chunk by chunk as the prompt is prefilled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen1m.outputs import Logprob, TokenLogprobs


@dataclass(slots=True)
class LogprobRows:
    """Logprobs of some rows of a step: on the device until ``to_host``."""

    rows: list[int]  # which rows of the step (indices into its sampling sequences)
    counts: list[int]  # top logprobs asked for, per row
    chosen: torch.Tensor  # [rows] float32 the chosen token's logprob
    ranks: torch.Tensor  # [rows] int64 its rank
    top_values: torch.Tensor  # [rows, max(counts)] float32, descending
    top_ids: torch.Tensor  # [rows, max(counts)] int64

    def to_host(self, pinned: bool) -> LogprobRows:
        """Copies on the host (pinned and non-blocking on a GPU: ready once the step's event is)."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            if not pinned:
                return t.cpu()
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        return LogprobRows(self.rows, self.counts, copy(self.chosen), copy(self.ranks), copy(self.top_values),
                           copy(self.top_ids))


def compute(logits: torch.Tensor, rows: list[int], counts: list[int], tokens: torch.Tensor) -> LogprobRows:
    """logits: [num_rows, vocab]; rows: the rows that asked, with their top-k counts; tokens: [len(rows)]
    int64 the chosen (or, for a prompt, the next) token of each, on the logits' device."""
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # [len(rows), vocab]
    chosen = logprobs.gather(1, tokens[:, None])  # [len(rows), 1]
    ranks = (logprobs > chosen).sum(-1) + 1
    top = torch.topk(logprobs, max(counts), dim=-1) if max(counts) else None
    empty = logprobs.new_empty(len(rows), 0)
    return LogprobRows(rows, counts, chosen[:, 0], ranks, top.values if top is not None else empty,
                       top.indices if top is not None else empty.long())


def to_dicts(lp: LogprobRows, tokens: list[int], text: Callable[[int], str | None]) -> list[TokenLogprobs]:
    """One ``{token id: Logprob}`` per row of ``lp``; tokens: the chosen token of each row."""
    chosen, ranks = lp.chosen.tolist(), lp.ranks.tolist()
    top_values, top_ids = lp.top_values.tolist(), lp.top_ids.tolist()
    out = []
    for i, token in enumerate(tokens):
        entry = {token: Logprob(chosen[i], ranks[i], text(token))}
        for rank, (t, v) in enumerate(zip(top_ids[i][:lp.counts[i]], top_values[i]), start=1):
            if t not in entry:
                entry[t] = Logprob(v, rank, text(t))
        out.append(entry)
    return out


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], count: int,
                    text: Callable[[int], str | None]) -> list[TokenLogprobs]:
    """logits: [positions, vocab] of consecutive prompt positions; next_ids: the prompt token each
    position predicts (as many as positions, or one fewer at the prompt's end)."""
    n = len(next_ids)
    if n == 0:
        return []
    lp = compute(logits[:n], list(range(n)), [count] * n, torch.tensor(next_ids, device=logits.device))
    return to_dicts(lp, next_ids, text)
