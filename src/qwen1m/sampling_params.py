"""SamplingParams: vLLM's names and defaults, validated once with errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen1m.errors import RequestError


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
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.n < 1:
            raise RequestError(f"SamplingParams.n must be at least 1, got {self.n}.")
        if self.temperature < 0:
            raise RequestError(f"SamplingParams.temperature must be >= 0, got {self.temperature}.")
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
