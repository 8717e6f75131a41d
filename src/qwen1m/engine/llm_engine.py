"""The engine: requests in, one scheduled model step at a time, outputs out (nano-vllm's loop).

    add_request(...)  ->  Scheduler (token budget)  ->  ModelRunner.run: inputs, model.forward, the
                          sampling rows' tokens launched  ->  OutputProcessor: tokens appended, stop
                          checks, RequestOutput

Prefill memory: one step sees at most ``max_num_batched_tokens`` tokens, so MLP activations are
bounded by that budget (the report's 32K chunks), and logits are computed only for rows that sample.

Decode speed: with CUDA graphs the engine overlaps steps (``step``): the next decode is launched from
the device tokens (greedy, or sampled without penalties or logits processors) before the host
has looked at this step's tokens.

KV blocks: ``KVAllocator`` (``kv_allocator.py``) gives each sequence blocks as it grows, and the
scheduler preempts the newest sequence when one cannot grow (``scheduler.py``); with
prefix caching (``prefix_caching``, off by default) a prompt's full blocks stay cached after its
request, and a later prompt that starts with the same tokens starts with them computed.
"""

from __future__ import annotations

import itertools
import time

import torch

from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.detokenizer import IncrementalDetokenizer
from qwen1m.engine.kv_allocator import KVAllocator
from qwen1m.engine.model_runner import ModelRunner
from qwen1m.engine.output_processor import OutputProcessor
from qwen1m.engine.scheduler import Scheduler
from qwen1m.engine.sequence import Sequence
from qwen1m.engine.step_tokens import LaunchedStep
from qwen1m.errors import RequestError
from qwen1m.model.qwen2 import Qwen2ForCausalLM
from qwen1m.outputs import PrefillProgress, RequestOutput
from qwen1m.sampling_params import SamplingParams


class LLMEngine:
    def __init__(
        self,
        model: Qwen2ForCausalLM,
        tokenizer,
        *,
        kv_cache: PagedKVCache,
        max_model_len: int,
        max_num_batched_tokens: int,  # no defaults here: EngineConfig's are the only ones
        max_num_seqs: int,
        cuda_graphs: bool = False,
        overlap: bool | None = None,
        prefix_caching: bool = False,
        kv_tiers=None,
    ):
        """kv_tiers: a ``cache.kv_tiers.KVTiers`` (host memory, disk) under the prefix cache; it turns
        prefix caching on."""
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.device = model.lm_head.weight.device
        self.kv_cache = kv_cache
        prefix_caching = prefix_caching or kv_tiers is not None
        self.kv = KVAllocator(kv_cache, self.device, model.backend.key_scale, prefix_caching, kv_tiers)
        self.block_pool, self.prefix_cache = self.kv.block_pool, self.kv.prefix_cache  # for inspection
        self.scheduler = Scheduler(max_num_batched_tokens, max_num_seqs, self.kv.allocate, self.kv.release,
                                   self.kv.match_again if prefix_caching else None, grow=self.kv.grow,
                                   fits=self.kv.fits)
        eos_ids: set[int] = set(self.cfg.eos_token_ids)
        if tokenizer is not None:
            eos_ids |= set(tokenizer.eos_token_ids)
        self.output = OutputProcessor(tokenizer, eos_ids, self.scheduler)
        self.eos_ids, self.requests = eos_ids, self.output.requests  # for inspection
        self.runner = ModelRunner(model, self.kv, self.output.token_text, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, cuda_graphs=cuda_graphs)
        self._ids = itertools.count()
        self._prefilled: list[Sequence] = []  # sequences that computed prompt tokens in the last step
        # overlapped decode (see step): on by default where it pays, with CUDA graphs (the host's
        # work is then what stands between two steps); tests turn it on for the CPU
        self.overlap = cuda_graphs if overlap is None else overlap
        self._ahead: LaunchedStep | None = None  # a launched step whose outputs the next call returns

    # ---- requests -------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> str:
        """prompt_token_ids: the ids of a text prompt when the caller has encoded it already."""
        request_id = request_id or str(next(self._ids))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("This model has no tokenizer.json, so prompts must be lists of token ids.")
            text = prompt
            ids = self.tokenizer.encode(prompt) if prompt_token_ids is None else list(prompt_token_ids)
        else:
            text, ids = None, list(prompt)
        self.check_prompt(ids, request_id)
        bad = next((t for t in params.logit_bias or () if t >= self.cfg.vocab_size), None)
        if bad is not None:
            raise RequestError(f"Request {request_id}: logit_bias token id {bad} is outside the vocabulary "
                               f"[0, {self.cfg.vocab_size}).")
        max_new = self.check_max_tokens(params.max_tokens, len(ids), request_id)
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if not params.greedy:
                gen = torch.Generator().manual_seed(params.seed + i if params.seed is not None else
                                                    int(torch.randint(0, 2**62, (1,)).item()))
            seq = Sequence(request_id, i, text, list(ids), len(ids), params, len(ids) + max_new,
                           generator=gen, arrival_time=now)
            if params.logprobs is not None:
                seq.logprobs = []
            if params.prompt_logprobs is not None and i == 0:  # the copies share the prompt: one computes
                seq.prompt_logprobs = [None]  # nothing predicts the first prompt token
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.output.add(request_id, seqs, len(ids))
        return request_id

    def check_max_tokens(self, max_tokens: int | None, num_prompt_tokens: int, request_id: str = "") -> int:
        """The new tokens a request may generate: ``max_tokens``, or all the room left when None.

        A max_tokens that does not fit is an error, not silently trimmed: the caller asked for a
        length it cannot get, and a trimmed answer would look like the model chose to stop there.
        """
        room = self.max_model_len - num_prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise RequestError(_sentence(
                _who(request_id), f"max_tokens={max_tokens} and the prompt's {num_prompt_tokens} tokens exceed "
                f"max_model_len={self.max_model_len} (at most {room} new tokens fit)."))
        return room if max_tokens is None else max_tokens

    def check_prompt(self, ids: list[int], request_id: str = "", label: str | None = None) -> None:
        """label: how the error names the prompt (default "Request <request_id>: ", or nothing when
        there is no request id, as for ``prompt_logits``)."""
        who = f"{label}: " if label else _who(request_id)
        if not ids:
            raise RequestError(_sentence(who, "the prompt is empty."))
        if len(ids) >= self.max_model_len:
            raise RequestError(_sentence(
                who, f"the prompt has {len(ids)} tokens but max_model_len is "
                f"{self.max_model_len}; shorten the prompt or raise max_model_len."))
        bad = next((t for t in ids if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise RequestError(_sentence(who, f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})."))

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self.output.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by running sequences (0.0 - 1.0); idle prefix-cache blocks
        count as free (an allocation takes them when it needs them)."""
        usable = self.block_pool.num_blocks - self.kv.num_reserved  # minus the pad block
        return 1.0 - self.kv.num_available() / max(1, usable)

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step and return the outputs of the requests it advanced.

        Overlapped decode (``self.overlap``, on with CUDA graphs): once a step is launched, the next
        one is launched too before this one's tokens reach the host, its input tokens taken on the
        device from this step's tokens (``ModelRunner.launch_ahead``); the host then waits, does the
        stop checks and returns while the GPU computes the next step, so the host's per-step work
        (~1 ms at 32K on the H200, profile_decode --host) no longer leaves the GPU idle. The next call
        finds that step launched. Rows of sequences that finished meanwhile are dropped.
        """
        launched, self._ahead = self._ahead, None
        if launched is not None and all(seq.is_finished for seq in launched.samplers):
            launched = None  # it computed only for sequences that finished since (EOS, stop, abort)
        if launched is None:
            scheduled = self.scheduler.schedule()
            for seq, error in self.scheduler.take_failed():
                self.output.fail_request(seq.request_id, error)
            if not scheduled:
                return self.output.take_failed()
            launched = self.runner.run(scheduled)
        self._prefilled = launched.prefilled
        if self.overlap:
            try:
                self._ahead = self.runner.launch_ahead(launched, self.scheduler)
            except BaseException:  # keep this step's tokens (the next outputs carry them), then report
                self.output.process(launched, {})
                raise
        return self.output.process(launched, self._ahead.inputs_from if self._ahead is not None else {})

    def prefill_progress(self) -> list[PrefillProgress]:
        """Progress of the sequences that computed prompt tokens in the last step."""
        now, report = time.monotonic(), []
        for seq in self._prefilled:
            if seq.index:  # n > 1: the copies of one prompt move together; report the first
                continue
            done = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            elapsed = max(now - (seq.prefill_start_time or now), 1e-9)
            rate = done / elapsed
            eta = (seq.num_prompt_tokens - done) / rate if rate > 0 else None
            report.append(PrefillProgress(seq.request_id, done, seq.num_prompt_tokens, rate, eta))
        return report

    # ---- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position, through the same forward as generation, chunk by chunk."""
        self.check_prompt(token_ids)
        n = len(token_ids)
        cache = self.kv.reserve(n)
        if cache is None:
            raise RequestError(f"Not enough free KV cache blocks to score {n} tokens now "
                               f"({self.kv.num_available()} of {self.block_pool.num_blocks} blocks free).")
        try:
            return self.runner.prompt_logits(token_ids, cache, self.max_num_batched_tokens)
        finally:
            self.kv.free(cache)


def _who(request_id: str) -> str:
    """An error's prefix naming the request ("Request 7: "), or nothing when it has no id: a bare
    "Request : ..." names nothing."""
    return f"Request {request_id}: " if request_id else ""


def _sentence(prefix: str, text: str) -> str:
    """``prefix + text``, capitalised when there is no prefix to start the sentence."""
    return prefix + text if prefix else text[:1].upper() + text[1:]
