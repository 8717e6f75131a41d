"""Token sampling: greedy, temperature, top-k, top-p, min-p; vLLM's order of filters.

One row's numbers never fail the batch: a row whose filtered probabilities are not a distribution
(inf or nan from extreme logits, nothing left after the filters) takes the argmax of its finite logits
instead, the limit of sampling as the temperature goes to 0; a row with no finite logit at all (a
broken model) raises ``SamplingError`` for that sequence only.
"""

from __future__ import annotations

import torch

from qwen1m.errors import Qwen1mError
from qwen1m.sampling_params import SamplingParams


class SamplingError(Qwen1mError):
    """The model's logits for one sequence hold no finite value: nothing to sample from."""


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [vocab] float32 for one sequence -> the next token id."""
    if params.greedy:
        return _argmax_finite(logits)
    raw, logits = logits, logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = (cumulative - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0 or not torch.isfinite(probs).all():
        return _argmax_finite(raw)
    probs = probs / total
    # sample on the CPU generator so a seed gives the same tokens on any device
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def _argmax_finite(logits: torch.Tensor) -> int:
    """argmax over the finite entries (argmax alone would pick a nan)."""
    finite = torch.isfinite(logits)
    if not finite.any():
        raise SamplingError("The model produced no finite logit for this sequence, so no token could be sampled.")
    if finite.all():
        return int(torch.argmax(logits).item())
    return int(torch.argmax(logits.masked_fill(~finite, float("-inf"))).item())
