"""The engine: requests in, one scheduled model step at a time, outputs out.

    add_request(...)  ->  Scheduler (token budget)  ->  model.forward(flat tokens, AttentionMetadata)
                      ->  logits of the rows that sample  ->  sampler  ->  stop checks  ->  RequestOutput

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

import functools
import itertools
import logging
import time

import torch

from qwen1m.attention.metadata import AttentionMetadata, SequenceSlice
from qwen1m.cache.paged_kv import PagedKVCache
from qwen1m.cache.planner import LOGITS_ROWS
from qwen1m.detokenizer import IncrementalDetokenizer
from qwen1m.engine import logprobs as lp
from qwen1m.engine.kv_allocator import KVAllocator
from qwen1m.engine.output_processor import check_stop, request_output
from qwen1m.engine.sampler import sample_batch
from qwen1m.engine.scheduler import ScheduledSequence, Scheduler
from qwen1m.engine.sequence import Sequence
from qwen1m.engine.step_tokens import LaunchedStep, choose_on_device, read_tokens
from qwen1m.errors import Qwen1mError, RequestError
from qwen1m.model.qwen2 import Qwen2ForCausalLM
from qwen1m.outputs import PrefillProgress, RequestOutput
from qwen1m.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# the token id an overlapped launch appends for a token still on the device (never read: the
# step's input ids come from the device, and _finish writes the real id before anyone looks)
_PLACEHOLDER = -1


class LLMEngine:
    def __init__(
        self,
        model: Qwen2ForCausalLM,
        tokenizer,
        *,
        kv_cache: PagedKVCache,
        max_model_len: int,
        max_num_batched_tokens: int = 32768,
        max_num_seqs: int = 64,
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
        self.graph_runner = None
        if cuda_graphs:  # decode steps replay CUDA graphs; one block is kept for the padding rows' writes
            from qwen1m.engine.cuda_graph import DecodeGraphRunner

            (pad_block,) = self.block_pool.allocate(1)
            self.kv.num_reserved = 1
            self.graph_runner = DecodeGraphRunner(model, kv_cache, pad_block, max_num_seqs, max_model_len)
        self._ids = itertools.count()
        self.eos_ids: set[int] = set(self.cfg.eos_token_ids)
        if tokenizer is not None:
            self.eos_ids |= set(tokenizer.eos_token_ids)
        self.requests: dict[str, list[Sequence]] = {}
        # each request's prompt ids, copied once: a RequestOutput per step must not copy a 1M-token
        # prompt out of a sequence's token list (4 ms per decode step on one CPU core)
        self._prompt_ids: dict[str, list[int]] = {}
        self._prefilled: list[Sequence] = []  # sequences that computed prompt tokens in the last step
        # overlapped decode (see step): on by default where it pays, with CUDA graphs (the host's
        # work is then what stands between two steps); tests turn it on for the CPU
        self.overlap = cuda_graphs if overlap is None else overlap
        self._ahead: LaunchedStep | None = None  # a launched step whose outputs the next call returns
        self._failed: list[RequestOutput] = []  # requests ended by their own error, for the next outputs
        # a token's text alone, for logprobs (cached: the same few thousand tokens come up again)
        self._token_text = functools.lru_cache(maxsize=1 << 16)(
            (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer is not None else (lambda t: None))

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
        self.requests[request_id] = seqs
        self._prompt_ids[request_id] = seqs[0].token_ids[:len(ids)]
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
        self.requests.pop(request_id, None)
        self._prompt_ids.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by running sequences (0.0 - 1.0); idle prefix-cache blocks
        count as free (an allocation takes them when it needs them)."""
        usable = self.block_pool.num_blocks - (1 if self.graph_runner is not None else 0)  # minus the pad block
        return 1.0 - self.kv.num_available() / max(1, usable)

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step and return the outputs of the requests it advanced.

        Overlapped decode (``self.overlap``, on with CUDA graphs): once a step is launched, the next
        one is launched too before this one's tokens reach the host, its input tokens taken on the
        device from this step's tokens (``_launch_ahead``); the host then waits, does the stop checks
        and returns while the GPU computes the next step, so the host's per-step work (~1 ms at 32K
        on the H200, profile_decode --host) no longer leaves the GPU idle. The next call finds that
        step launched. Rows of sequences that finished meanwhile are dropped.
        """
        launched, self._ahead = self._ahead, None
        if launched is not None and all(seq.is_finished for seq in launched.samplers):
            launched = None  # it computed only for sequences that finished since (EOS, stop, abort)
        if launched is not None:
            self._prefilled = launched.prefilled
        else:
            scheduled = self.scheduler.schedule()
            self._fail_unfit()
            if not scheduled:
                return self._take_failed()
            launched = self._launch(scheduled)
        if self.overlap:
            try:
                self._ahead = self._launch_ahead(launched)
            except BaseException:  # keep this step's tokens (the next outputs carry them), then report
                self._finish(launched, {})
                raise
        return self._finish(launched, self._ahead.inputs_from if self._ahead is not None else {})

    def _launch(self, scheduled: list[ScheduledSequence], device_ids: torch.Tensor | None = None) -> LaunchedStep:
        """Enqueue a step's forward (and, when every sampling row's token is chosen on the device, that
        choice and the copy of the tokens to the host: ``step_tokens.choose_on_device``). device_ids: the
        input token of every row, on the device (an overlapped step: every row decodes one token whose id
        the host does not know yet)."""
        ids, positions, slices, sample_rows, samplers = [], [], [], [], []
        start = 0
        now = time.monotonic()
        self._prefilled = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            c = seq.num_computed_tokens
            if c < seq.num_prompt_tokens:
                self._prefilled.append(seq)
                if seq.prefill_start_time is None:
                    seq.prefill_start_time = now
            ids.extend(seq.token_ids[c:c + n])
            positions.extend(range(c, c + n))
            slices.append(SequenceSlice(start, n, c, max(seq.num_prompt_tokens, c + n), seq.cache,
                                        seq.num_prompt_tokens))
            if c + n == seq.num_tokens:  # every known token computed: this row predicts the next one
                sample_rows.append(start + n - 1)
                samplers.append(seq)
            start += n
        logits = None
        scoring = [(item, offset) for item, offset in zip(scheduled, itertools.accumulate(
            [0] + [item.num_tokens for item in scheduled])) if self._scores_prompt(item)]
        if self.graph_runner is not None and not scoring and all(s.num_query == 1 and s.num_cached > 0
                                                                   for s in slices):
            # None when the batch fits no captured bucket
            logits = self.graph_runner.run(ids, slices, device_ids)
        if logits is None:
            # non_blocking: with a step in flight a blocking host->device copy would wait for it
            meta = AttentionMetadata(torch.tensor(positions).to(self.device, non_blocking=True), slices)
            input_ids = device_ids if device_ids is not None else torch.tensor(ids).to(self.device, non_blocking=True)
            hidden = self.model(input_ids, meta)
            for item, offset in scoring:
                self._score_prompt(item, hidden[offset:offset + item.num_tokens])
            logits = self.model.compute_logits(hidden[sample_rows]) if samplers else None
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            self.kv.register(item.seq)
        launched = LaunchedStep(samplers, logits, list(self._prefilled))
        choose_on_device(launched)
        return launched

    def _launch_ahead(self, launched: LaunchedStep) -> LaunchedStep | None:
        """Launch the step after ``launched`` before its tokens are known, when that step is certain
        to be a decode of its sequences: every sampling row's token chosen on the device (greedy, or
        sampled without penalties or logits processors: ``sampler.on_device``), every
        running sequence sampling in it, nothing waiting to be admitted. Each sequence gets a
        placeholder token (replaced by ``_finish``); one whose token ends it by length gets none and
        sits the step out. A sequence that turns out to stop (EOS, stop token or string) had its
        next token computed for nothing: that row is dropped."""
        if launched.tokens is None or self.scheduler.waiting:
            return None
        sampling = {id(seq): i for i, seq in enumerate(launched.samplers)}
        if any(id(seq) not in sampling for seq in self.scheduler.running):
            return None  # some sequence is still prefilling: the next step is not a pure decode
        if not self.kv.can_grow([s for s in launched.samplers if s.cache is not None], 1):
            return None  # a sequence needs a block that only a preemption would free: plan it normally
        inputs_from = {}
        for seq in launched.samplers:
            if not seq.is_finished and seq.num_tokens + 1 < seq.max_len:
                seq.token_ids.append(_PLACEHOLDER)
                inputs_from[id(seq)] = sampling[id(seq)]
        if not inputs_from:
            return None
        scheduled = self.scheduler.schedule()
        # every running sequence has one uncomputed token (its placeholder) or none: all decodes
        assert all(item.num_tokens == 1 and id(item.seq) in inputs_from for item in scheduled), \
            "overlapped decode: the scheduler planned something other than the placeholder decodes"
        rows = [inputs_from[id(item.seq)] for item in scheduled]
        ids = launched.tokens
        if rows != list(range(len(launched.samplers))):  # a row sits out, or the order changed
            # (non_blocking: a blocking host->device copy would wait for the step in flight)
            ids = ids[torch.tensor(rows).to(ids.device, non_blocking=True)]
        prefilled = self._prefilled  # what the step before computed of prompts, for prefill_progress
        try:
            ahead = self._launch(scheduled, device_ids=ids)
        except BaseException:  # nothing was computed for them: take the placeholders back
            for seq in launched.samplers:
                if id(seq) in inputs_from:
                    seq.token_ids.pop()
            raise
        self._prefilled, ahead.prefilled = prefilled, []
        ahead.inputs_from = inputs_from
        return ahead

    def _finish(self, launched: LaunchedStep, placeholders: dict[int, int]) -> list[RequestOutput]:
        """Wait for a step's tokens, append them (or put them in place of the placeholders an
        overlapped launch appended), run the stop checks and build the outputs."""
        samplers = launched.samplers
        if not samplers:
            return self._take_failed()
        tokens, logprobs = read_tokens(launched, self._token_text, self._sample)
        touched: dict[str, None] = {}
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(samplers, tokens)):
            if seq.is_finished:  # finished (or aborted) after this step was launched: drop its row
                continue
            if isinstance(token, Exception):  # this row could not be sampled: its request fails alone
                self._fail_request(seq.request_id, token)
                continue
            if id(seq) in placeholders:
                seq.token_ids[-1] = token
            else:
                seq.token_ids.append(token)
            if seq.logprobs is not None:
                entry = logprobs[i]
                seq.logprobs.append(entry)
                seq.cumulative_logprob += entry[token].logprob
            if seq.first_token_time is None:
                seq.first_token_time = now
            try:
                self._check_stop(seq, token)
            except Exception as e:  # e.g. detokenizing: one request's failure, not the batch's
                self._fail_request(seq.request_id, e)
                continue
            touched[seq.request_id] = None
        return self._take_failed() + [self._request_output(rid) for rid in touched if rid in self.requests]

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int | Exception]:
        """One token per row, or the exception that row raised (the others are unaffected); plain
        greedy rows in one argmax and one device->host copy for the batch (``sampler.py``)."""
        return sample_batch(logits, seqs)

    @staticmethod
    def _scores_prompt(item: ScheduledSequence) -> bool:
        """Whether this step computes prompt positions whose logprobs the sequence still lacks."""
        seq, c = item.seq, item.seq.num_computed_tokens
        # position p scores prompt token p + 1: positions len(prompt_logprobs) - 1 .. num_prompt_tokens - 2
        return (seq.prompt_logprobs is not None
                and max(c, len(seq.prompt_logprobs) - 1) < min(c + item.num_tokens, seq.num_prompt_tokens - 1))

    def _score_prompt(self, item: ScheduledSequence, hidden: torch.Tensor) -> None:
        """Append the logprobs of the prompt tokens that this chunk's positions predict (a preempted
        sequence computes its prompt again: positions already scored are skipped)."""
        seq, c = item.seq, item.seq.num_computed_tokens
        for r in range(0, item.num_tokens, LOGITS_ROWS):  # the lm_head in slices, as prompt_logits does
            first = c + r  # position of this slice's first row; it predicts token first + 1
            m = min(LOGITS_ROWS, item.num_tokens - r)
            start = max(first, len(seq.prompt_logprobs) - 1)
            end = min(first + m, seq.num_prompt_tokens - 1)  # the last prompt position predicts an output
            if start >= end:
                continue
            logits = self.model.compute_logits(hidden[start - c:end - c])
            seq.prompt_logprobs.extend(lp.prompt_logprobs(logits, seq.token_ids[start + 1:end + 1],
                                                          seq.params.prompt_logprobs, self._token_text))

    def _fail_request(self, request_id: str, error: Exception) -> None:
        """End one request with an error output (its KV freed); the rest of the step goes on."""
        if request_id not in self.requests:
            return
        logger.warning("request %s failed: %s: %s", request_id, type(error).__name__, error)
        seqs = self.requests[request_id]
        self.scheduler.abort(request_id)
        for s in seqs:
            s.finish_reason = "error"
        out = self._request_output(request_id)
        out.error = str(error) if isinstance(error, Qwen1mError) else f"Internal error ({type(error).__name__})."
        self._failed.append(out)

    def _fail_unfit(self) -> None:
        for seq, error in self.scheduler.take_failed():
            self._fail_request(seq.request_id, error)

    def _take_failed(self) -> list[RequestOutput]:
        failed, self._failed = self._failed, []
        return failed

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

    def _check_stop(self, seq: Sequence, token: int) -> None:
        if check_stop(seq, token, self.eos_ids):
            self.scheduler.finish(seq)

    def _request_output(self, request_id: str) -> RequestOutput:
        out = request_output(request_id, self.requests[request_id], self._prompt_ids[request_id])
        if out.finished:
            del self.requests[request_id]
            del self._prompt_ids[request_id]
        return out

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
            ids = torch.tensor(token_ids, device=self.device)
            chunks = []
            for c in range(0, n, self.max_num_batched_tokens):
                m = min(self.max_num_batched_tokens, n - c)
                meta = AttentionMetadata(torch.arange(c, c + m, device=self.device),
                                         [SequenceSlice(0, m, c, n, cache, n)])
                hidden = self.model(ids[c:c + m], meta)
                # the lm_head in slices: [rows, vocab] float32 stays small even for 32K-token chunks
                chunks.extend(self.model.compute_logits(hidden[r:r + LOGITS_ROWS]).cpu()
                              for r in range(0, m, LOGITS_ROWS))
            return torch.cat(chunks)
        finally:
            self.kv.free(cache)


def _who(request_id: str) -> str:
    """An error's prefix naming the request ("Request 7: "), or nothing when it has no id: a bare
    "Request : ..." names nothing."""
    return f"Request {request_id}: " if request_id else ""


def _sentence(prefix: str, text: str) -> str:
    """``prefix + text``, capitalised when there is no prefix to start the sentence."""
    return prefix + text if prefix else text[:1].upper() + text[1:]
