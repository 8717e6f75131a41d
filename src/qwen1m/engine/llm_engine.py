"""The engine: requests in, one scheduled model step at a time, outputs out.

    add_request(...)  ->  Scheduler (token budget)  ->  model.forward(flat tokens, AttentionMetadata)
                      ->  logits of the rows that sample  ->  sampler  ->  stop checks  ->  RequestOutput

Prefill memory: one step sees at most ``max_num_batched_tokens`` tokens, so MLP activations are
bounded by that budget (the report's 32K chunks), and logits are computed only for rows that sample.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from qwen1m.attention.metadata import AttentionMetadata, SequenceSlice
from qwen1m.cache.block_pool import BlockPool
from qwen1m.cache.paged_kv import PagedKVCache, SequenceBlocks
from qwen1m.cache.planner import LOGITS_ROWS
from qwen1m.detokenizer import IncrementalDetokenizer
from qwen1m.engine.sampler import sample
from qwen1m.engine.scheduler import Scheduler
from qwen1m.engine.sequence import Sequence
from qwen1m.errors import RequestError
from qwen1m.model.qwen2 import Qwen2ForCausalLM
from qwen1m.outputs import CompletionOutput, PrefillProgress, RequestMetrics, RequestOutput
from qwen1m.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


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
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.device = model.lm_head.weight.device
        self.kv_cache = kv_cache
        self.block_pool = BlockPool(kv_cache.num_blocks)
        self.scheduler = Scheduler(max_num_batched_tokens, max_num_seqs, self._allocate, self._release)
        self.graph_runner = None
        if cuda_graphs:  # decode steps replay CUDA graphs; one block is kept for the padding rows' writes
            from qwen1m.engine.cuda_graph import DecodeGraphRunner

            (pad_block,) = self.block_pool.allocate(1)
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

    # ---- requests -------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        request_id = request_id or str(next(self._ids))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("This model has no tokenizer.json, so prompts must be lists of token ids.")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self.check_prompt(ids, request_id)
        room = self.max_model_len - len(ids)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        if max_new < 1:
            raise RequestError(
                f"Request {request_id}: the prompt has {len(ids)} tokens, which leaves no room to generate "
                f"within max_model_len={self.max_model_len}."
            )
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if not params.greedy:
                gen = torch.Generator().manual_seed(params.seed + i if params.seed is not None else
                                                    int(torch.randint(0, 2**62, (1,)).item()))
            seq = Sequence(request_id, i, text, list(ids), len(ids), params, len(ids) + max_new,
                           generator=gen, arrival_time=now)
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self._prompt_ids[request_id] = seqs[0].token_ids[:len(ids)]
        return request_id

    def check_prompt(self, ids: list[int], request_id: str = "") -> None:
        if not ids:
            raise RequestError(f"Request {request_id}: the prompt is empty.")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"Request {request_id}: the prompt has {len(ids)} tokens but max_model_len is "
                f"{self.max_model_len}; shorten the prompt or raise max_model_len."
            )
        bad = next((t for t in ids if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise RequestError(f"Request {request_id}: token id {bad} is outside the vocabulary "
                               f"[0, {self.cfg.vocab_size}).")

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
        """Fraction of KV blocks reserved by running sequences (0.0 - 1.0)."""
        usable = self.block_pool.num_blocks - (1 if self.graph_runner is not None else 0)  # minus the pad block
        return 1.0 - self.block_pool.num_free / max(1, usable)

    def _reserve(self, num_tokens: int) -> SequenceBlocks | None:
        blocks = self.block_pool.allocate(-(-num_tokens // self.kv_cache.block_size))
        return None if blocks is None else SequenceBlocks(self.kv_cache, blocks, self.device)

    def _allocate(self, seq: Sequence) -> bool:
        seq.cache = self._reserve(seq.max_len)
        return seq.cache is not None

    def _release(self, seq: Sequence) -> None:
        self.block_pool.free(seq.cache.blocks)

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
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
        if self.graph_runner is not None and all(s.num_query == 1 and s.num_cached > 0 for s in slices):
            logits = self.graph_runner.run(ids, slices)  # None when the batch fits no captured bucket
        if logits is None:
            meta = AttentionMetadata(torch.tensor(positions, device=self.device), slices)
            hidden = self.model(torch.tensor(ids, device=self.device), meta)
            logits = self.model.compute_logits(hidden[sample_rows]) if samplers else None
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_tokens
        touched: dict[str, None] = {}
        if samplers:
            now = time.monotonic()
            for seq, token in zip(samplers, self._sample(samplers, logits)):
                seq.token_ids.append(token)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                self._check_stop(seq, token)
                touched[seq.request_id] = None
        return [self._request_output(rid) for rid in touched]

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row; greedy rows in one argmax and one device->host copy for the batch."""
        tokens: list[int | None] = [None] * len(seqs)
        greedy = [i for i, seq in enumerate(seqs) if seq.params.greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                tokens[i] = t
        for i, seq in enumerate(seqs):
            if tokens[i] is None:
                tokens[i] = sample(logits[i], seq.params, seq.generator)
        return tokens

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
        params = seq.params
        if seq.detokenizer is not None:  # incremental: a few tokens decoded per step, not the whole output
            seq.output_text += seq.detokenizer.add(token)
        reason, stop = None, None
        if not params.ignore_eos and token in self.eos_ids:
            reason, stop = "stop", None
        elif params.stop_token_ids and token in params.stop_token_ids:
            reason, stop = "stop", token
        elif params.stop_strings:
            for s in params.stop_strings:
                at = seq.output_text.find(s, max(0, seq.emitted_text_len - len(s)))
                if at >= 0:
                    end = at + len(s) if params.include_stop_str_in_output else at
                    seq.output_text = seq.output_text[:end]
                    reason, stop = "stop", s
                    break
        if reason is None and seq.num_tokens >= seq.max_len:
            reason = "length"
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop
            seq.finished_time = time.monotonic()
            if not isinstance(stop, str) and seq.detokenizer is not None:
                seq.output_text += seq.detokenizer.flush()  # final: nothing will complete a held-back character
            self.scheduler.finish(seq)

    def _request_output(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        finished = all(s.is_finished for s in seqs)
        new_text = []
        for s in seqs:
            visible = len(s.output_text)
            if not s.is_finished and s.params.stop_strings:
                # hold back what could still turn out to be the start of a stop string
                visible = max(s.emitted_text_len, visible - (max(map(len, s.params.stop_strings)) - 1))
            new_text.append(s.output_text[s.emitted_text_len:visible])
            s.emitted_text_len = visible
        first = seqs[0]
        ttft = [s.first_token_time for s in seqs if s.first_token_time is not None]
        out = RequestOutput(
            request_id=request_id,
            prompt=first.prompt,
            prompt_token_ids=self._prompt_ids[request_id],
            outputs=[CompletionOutput(s.index, s.output_text, s.output_token_ids, s.finish_reason,
                                      s.stop_reason) for s in seqs],
            finished=finished,
            metrics=RequestMetrics(first.arrival_time, min(ttft) if ttft else None,
                                   max((s.finished_time or 0.0) for s in seqs) if finished else None),
            new_text=new_text,
        )
        if finished:
            del self.requests[request_id]
            del self._prompt_ids[request_id]
        return out

    # ---- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position, through the same forward as generation, chunk by chunk."""
        self.check_prompt(token_ids)
        n = len(token_ids)
        cache = self._reserve(n)
        if cache is None:
            raise RequestError(f"Not enough free KV cache blocks to score {n} tokens now "
                               f"({self.block_pool.num_free} of {self.block_pool.num_blocks} blocks free).")
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
            self.block_pool.free(cache.blocks)
