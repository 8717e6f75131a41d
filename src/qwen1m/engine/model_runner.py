"""The model runner: a scheduled batch in, the model run, the step's tokens on their way to the host.

    scheduled sequences -> prepare: ids, positions, one SequenceSlice each (block table, cached length),
                                    the rows that sample, the rows that score prompt tokens
                        -> metadata: AttentionMetadata; the decode batch's block tables, cache slots,
                                     key ranges and YaRN factors (``attention.metadata.decode_inputs``)
                        -> a replayed CUDA graph (an all-decode step that fits a bucket) or model.forward
                        -> logits of the sampling rows -> ``step_tokens.choose_on_device`` -> LaunchedStep

Overlapped decode (``launch_ahead``): the step after a launched one is launched before that step's
tokens reach the host, its input ids taken on the device from that step's tokens.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen1m.attention.metadata import AttentionMetadata, DecodeInputs, SequenceSlice, decode_inputs
from qwen1m.cache.planner import LOGITS_ROWS
from qwen1m.engine import logprobs as lp
from qwen1m.engine.kv_allocator import KVAllocator
from qwen1m.engine.scheduler import ScheduledSequence, Scheduler
from qwen1m.engine.sequence import Sequence
from qwen1m.engine.step_tokens import LaunchedStep, choose_on_device
from qwen1m.model.qwen2 import Qwen2ForCausalLM

# the token id an overlapped launch appends for a token still on the device (never read: the step's
# input ids come from the device, and the output processor writes the real id before anyone looks)
PLACEHOLDER = -1


@dataclass(slots=True)
class StepInputs:
    """The host side of one step's inputs, in the order of the scheduled sequences."""

    ids: list[int]  # [num_tokens] the step's new tokens, sequence after sequence
    positions: list[int]  # [num_tokens] absolute position of each
    slices: list[SequenceSlice]  # one per scheduled sequence; they tile [0, num_tokens)
    # rows whose logits are sampled: the last new token of each sequence with every known token computed
    sample_rows: list[int]
    samplers: list[Sequence]  # the sequences of sample_rows, in row order
    prefilled: list[Sequence]  # sequences that compute prompt tokens in this step
    scoring: list[tuple[ScheduledSequence, int]]  # (item, its first row) for those computing prompt logprobs

    @property
    def all_decode(self) -> bool:
        """Every sequence computes one token after cached ones (the steps CUDA graphs replay)."""
        return all(s.num_query == 1 and s.num_cached > 0 for s in self.slices)


class ModelRunner:
    """Turns scheduled sequences into model inputs, runs the model and launches the token choice."""

    def __init__(self, model: Qwen2ForCausalLM, kv: KVAllocator, token_text: Callable[[int], str | None], *,
                 max_num_seqs: int, max_model_len: int, cuda_graphs: bool = False):
        """token_text: a token's text alone, for prompt logprobs."""
        self.model = model
        self.kv = kv
        self.token_text = token_text
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype  # the activations' dtype: the YaRN factor multiplies q and k
        self.graph_runner = None
        if cuda_graphs:  # decode steps replay CUDA graphs; one block is kept for the padding rows' writes
            from qwen1m.engine.cuda_graph import DecodeGraphRunner

            (pad_block,) = kv.block_pool.allocate(1)
            kv.num_reserved = 1
            self.graph_runner = DecodeGraphRunner(model, kv.kv_cache, pad_block, max_num_seqs, max_model_len)

    # ---- inputs ---------------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        """The host-side inputs of a step (and the prefill start time of sequences starting theirs)."""
        ids, positions, slices, sample_rows, samplers, prefilled = [], [], [], [], [], []
        start = 0
        now = time.monotonic()
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            c = seq.num_computed_tokens
            if c < seq.num_prompt_tokens:
                prefilled.append(seq)
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
        scoring = [(item, offset) for item, offset in zip(scheduled, itertools.accumulate(
            [0] + [item.num_tokens for item in scheduled])) if _scores_prompt(item)]
        return StepInputs(ids, positions, slices, sample_rows, samplers, prefilled, scoring)

    def metadata(self, positions: torch.Tensor, slices: list[SequenceSlice]) -> AttentionMetadata:
        """The step's attention metadata, with the inputs of the rows the backend decodes in one batch
        built here, once, before the forward (every layer reads them)."""
        batched = self.model.backend.decode_batch(slices, self.device)
        return AttentionMetadata(positions, slices, self.decode_inputs(batched) if batched else None)

    def decode_inputs(self, slices: list[SequenceSlice]) -> DecodeInputs:
        """Block tables, cache slots, key ranges and YaRN factors of decoding sequences, on the device."""
        return decode_inputs(slices, self.device, self.dtype, self.model.dca)

    # ---- running --------------------------------------------------------------------------------
    def run(self, scheduled: list[ScheduledSequence], device_ids: torch.Tensor | None = None) -> LaunchedStep:
        """Enqueue a step's forward (and, when every sampling row's token is chosen on the device, that
        choice and the copy of the tokens to the host: ``step_tokens.choose_on_device``); the scheduled
        sequences count their tokens computed. device_ids: the input token of every row, on the device
        (an overlapped step: every row decodes one token whose id the host does not know yet)."""
        inputs = self.prepare(scheduled)
        logits = self._forward(inputs, device_ids)
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            self.kv.register(item.seq)
        launched = LaunchedStep(inputs.samplers, logits, inputs.prefilled)
        choose_on_device(launched)
        return launched

    def _forward(self, inputs: StepInputs, device_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Logits [sampling rows, vocab] (None when no row samples); prompt logprobs on the way."""
        graphs = self.graph_runner
        if graphs is not None and not inputs.scoring and inputs.all_decode and graphs.fits(inputs.slices):
            fresh = self.decode_inputs(inputs.slices)
            return graphs.run(inputs.ids, inputs.slices, fresh, device_ids)
        # non_blocking: with a step in flight a blocking host->device copy would wait for it
        meta = self.metadata(torch.tensor(inputs.positions).to(self.device, non_blocking=True), inputs.slices)
        input_ids = device_ids if device_ids is not None else torch.tensor(inputs.ids).to(self.device,
                                                                                          non_blocking=True)
        hidden = self.model(input_ids, meta)
        for item, offset in inputs.scoring:
            self._score_prompt(item, hidden[offset:offset + item.num_tokens])
        return self.model.compute_logits(hidden[inputs.sample_rows]) if inputs.samplers else None

    def launch_ahead(self, launched: LaunchedStep, scheduler: Scheduler) -> LaunchedStep | None:
        """Launch the step after ``launched`` before its tokens are known, when that step is certain
        to be a decode of its sequences: every sampling row's token chosen on the device (greedy, or
        sampled without penalties or logits processors: ``sampler.on_device``), every
        running sequence sampling in it, nothing waiting to be admitted. Each sequence gets a
        placeholder token (replaced by the output processor); one whose token ends it by length gets
        none and sits the step out. A sequence that turns out to stop (EOS, stop token or string) had
        its next token computed for nothing: that row is dropped."""
        if launched.tokens is None or scheduler.waiting:
            return None
        sampling = {id(seq): i for i, seq in enumerate(launched.samplers)}
        if any(id(seq) not in sampling for seq in scheduler.running):
            return None  # some sequence is still prefilling: the next step is not a pure decode
        if not self.kv.can_grow([s for s in launched.samplers if s.cache is not None], 1):
            return None  # a sequence needs a block that only a preemption would free: plan it normally
        inputs_from = {}
        for seq in launched.samplers:
            if not seq.is_finished and seq.num_tokens + 1 < seq.max_len:
                seq.token_ids.append(PLACEHOLDER)
                inputs_from[id(seq)] = sampling[id(seq)]
        if not inputs_from:
            return None
        scheduled = scheduler.schedule()
        # every running sequence has one uncomputed token (its placeholder) or none: all decodes
        assert all(item.num_tokens == 1 and id(item.seq) in inputs_from for item in scheduled), \
            "overlapped decode: the scheduler planned something other than the placeholder decodes"
        rows = [inputs_from[id(item.seq)] for item in scheduled]
        ids = launched.tokens
        if rows != list(range(len(launched.samplers))):  # a row sits out, or the order changed
            # (non_blocking: a blocking host->device copy would wait for the step in flight)
            ids = ids[torch.tensor(rows).to(ids.device, non_blocking=True)]
        try:
            ahead = self.run(scheduled, device_ids=ids)
        except BaseException:  # nothing was computed for them: take the placeholders back
            for seq in launched.samplers:
                if id(seq) in inputs_from:
                    seq.token_ids.pop()
            raise
        ahead.inputs_from = inputs_from
        return ahead

    # ---- scoring --------------------------------------------------------------------------------
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
                                                          seq.params.prompt_logprobs, self.token_text))

    def prompt_logits(self, token_ids: list[int], cache, chunk: int) -> torch.Tensor:
        """Logits [len(token_ids), vocab] on the host, through the same forward as generation, ``chunk``
        tokens per forward; cache: blocks reserved for the tokens."""
        n = len(token_ids)
        ids = torch.tensor(token_ids, device=self.device)
        chunks = []
        for c in range(0, n, chunk):
            m = min(chunk, n - c)
            meta = self.metadata(torch.arange(c, c + m, device=self.device), [SequenceSlice(0, m, c, n, cache, n)])
            hidden = self.model(ids[c:c + m], meta)
            # the lm_head in slices: [rows, vocab] float32 stays small even for 32K-token chunks
            chunks.extend(self.model.compute_logits(hidden[r:r + LOGITS_ROWS]).cpu()
                          for r in range(0, m, LOGITS_ROWS))
        return torch.cat(chunks)


def _scores_prompt(item: ScheduledSequence) -> bool:
    """Whether this step computes prompt positions whose logprobs the sequence still lacks."""
    seq, c = item.seq, item.seq.num_computed_tokens
    # position p scores prompt token p + 1: positions len(prompt_logprobs) - 1 .. num_prompt_tokens - 2
    return (seq.prompt_logprobs is not None
            and max(c, len(seq.prompt_logprobs) - 1) < min(c + item.num_tokens, seq.num_prompt_tokens - 1))
