"""A sequence: one completion of one request, with the scheduler's two counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from qwen1m.cache.paged_kv import SequenceBlocks
from qwen1m.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    request_id: str
    index: int  # completion index within its request (SamplingParams.n)
    prompt: str | None
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    max_len: int  # prompt + max new tokens: the KV cache is sized for this once
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    cache: SequenceBlocks | None = None  # its KV blocks while running
    generator: torch.Generator | None = None
    output_text: str = ""
    emitted_text_len: int = 0  # how much of output_text the caller has already seen
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    arrival_time: float = 0.0
    prefill_start_time: float | None = None  # when its first prompt chunk was scheduled
    first_token_time: float | None = None
    finished_time: float | None = None
    detokenizer: object | None = field(default=None, repr=False)
    # prefix caching: the keys of its full prompt blocks, how many of them are in the cache, and how
    # many prompt tokens it took from there
    block_keys: list[bytes] | None = field(default=None, repr=False)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    # sampling extras: the prompt's tokens as a [vocab] bool mask on the device, made once for
    # repetition_penalty; the logprobs asked for (SamplingParams.logprobs / prompt_logprobs), one
    # entry per generated / prompt token
    prompt_mask: torch.Tensor | None = field(default=None, repr=False)
    logprobs: list | None = field(default=None, repr=False)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list | None = field(default=None, repr=False)
    num_overtaken: int = 0  # later sequences admitted before it while its prompt did not fit (scheduler)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
