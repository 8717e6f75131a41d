"""SamplingParams: vLLM's names and defaults, validated once with errors that name the field."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen1m.errors import RequestError

logger = logging.getLogger(__name__)

SEED_MAX = 2**64 - 1  # seeds are unsigned 64-bit (torch.Generator, TGI's u64); vLLM allows the int64 range
# below this a temperature divides logits into inf (1e-300 did): vLLM raises it to the same floor,
# which is greedy in all but ties
MIN_TEMPERATURE = 1e-2
MAX_N = 128  # completions per prompt: OpenAI's own bound


@dataclass(slots=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's hook: each is called as proc(output_token_ids, logits[vocab]) -> logits, in order, before
    # any other filter (JSON mode masks tokens this way); a row with processors never takes the
    # device-side greedy fast path
    logits_processors: list[Callable] | None = None
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise RequestError(f"SamplingParams.n must be in [1, {MAX_N}], got {self.n}.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"SamplingParams.temperature must be >= 0 and finite, got {self.temperature}.")
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.info("temperature %g raised to %g (smaller values overflow the logits)", self.temperature,
                        MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX - (self.n - 1):
            # completion j of n is seeded with seed + j: every one of them must be a valid seed
            raise RequestError(f"SamplingParams.seed must be in [0, 2**64 - n] = [0, {SEED_MAX - (self.n - 1)}] "
                               f"for n={self.n}, got {_quote(self.seed)}.")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise RequestError(f"SamplingParams.top_k must be -1, 0 (disabled) or positive, got {self.top_k}.")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"SamplingParams.max_tokens must be at least 1, got {self.max_tokens}.")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise RequestError("SamplingParams.stop must be a non-empty string or a list of non-empty strings.")
        self.stop_strings = tuple(stops)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            raise RequestError("SamplingParams.stop_token_ids must be a list of non-negative token ids.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that rewrites the logits: an argmax on the device is its token."""
        return self.greedy and not self.logits_processors


def _quote(value: object, limit: int = 40) -> str:
    """A value for an error message, cut to ``limit`` characters (a 10**100000 seed is 100K digits)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
