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
MAX_LOGPROBS = 20  # top logprobs per token: OpenAI's and vLLM's default bound (max_logprobs=20)
MAX_LOGIT_BIAS = 100.0  # |bias| bound: OpenAI's [-100, 100]


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
    # penalties, vLLM's names and meanings: presence and frequency (OpenAI's) subtract from the logits
    # of tokens generated so far, once and per occurrence; repetition (HF's) divides the positive and
    # multiplies the negative logits of tokens in the prompt or the output (1.0: off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    # top logprobs per generated token (0: only the sampled token's) / per prompt token; computed from
    # the model's raw distribution, before any processor, bias, penalty or temperature (vLLM's default)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    best_of: int | None = None  # accepted only as n: the server returns every completion it generates
    use_beam_search: bool = False  # refused: no beam search here
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise RequestError(f"SamplingParams.{name} must be in [-2, 2], got {_quote(value)}.")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty <= 100:
            raise RequestError(f"SamplingParams.repetition_penalty must be in (0, 100] (1 is off), "
                               f"got {_quote(self.repetition_penalty)}.")
        self._check_logit_bias()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(f"SamplingParams.{name} must be None or an integer in [0, {MAX_LOGPROBS}], "
                                   f"got {_quote(value)}.")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"SamplingParams.best_of must be None or equal to n={self.n} (every generated "
                               f"completion is returned), got {_quote(self.best_of)}.")
        if self.use_beam_search:
            raise RequestError("SamplingParams.use_beam_search is not supported: qwen1m has no beam search.")

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise RequestError("SamplingParams.logit_bias must be a dict of token id -> bias.")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise RequestError(f"SamplingParams.logit_bias keys must be non-negative token ids, "
                                   f"got {_quote(token)}.")
            numeric = isinstance(bias, (int, float)) and not isinstance(bias, bool)
            if not numeric or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise RequestError(f"SamplingParams.logit_bias values must be in [-100, 100], got "
                                   f"{_quote(bias)} for token {token}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def rewrites_logits(self) -> bool:
        """Whether anything changes the logits before the token is chosen (the greedy token too)."""
        return bool(self.logits_processors or self.logit_bias or self.has_penalties)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that rewrites the logits: an argmax on the device is its token (its
        logprobs, if asked for, are read from the same raw logits)."""
        return self.greedy and not self.rewrites_logits


def _quote(value: object, limit: int = 40) -> str:
    """A value for an error message, cut to ``limit`` characters (a 10**100000 seed is 100K digits)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
