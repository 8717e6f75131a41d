"""Result records returned by ``LLM.generate`` (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """One token's log probability under the model's raw distribution (vLLM's record)."""

    logprob: float
    rank: int  # 1 + the number of tokens more likely than it
    decoded_token: str | None = None  # its text alone (None without a tokenizer)


# per position: token id -> Logprob, the chosen token first, then the top-k by rank (vLLM's shape)
TokenLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string), "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None  # the sum of the chosen tokens' logprobs (with logprobs)


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    new_text: list[str] = field(default_factory=list)  # per completion: text added since the last step
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    error: str | None = None  # set (finished, finish_reason "error") when this request alone failed
    # one per prompt token when SamplingParams.prompt_logprobs is set; the first is None (nothing
    # predicts it), as in vLLM
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(slots=True)
class PrefillProgress:
    """Where a long prefill stands, reported after each engine step."""

    request_id: str
    done: int  # prompt tokens computed
    total: int  # prompt tokens
    tokens_per_s: float
    eta_s: float | None  # seconds left at the current rate

    @property
    def finished(self) -> bool:
        return self.done >= self.total
