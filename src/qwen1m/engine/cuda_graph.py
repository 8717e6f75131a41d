"""CUDA graphs for decode steps (the gpt-fast habit): eager decode launches ~90 kernels per layer, so
a 7B decode step is bound by launches (~85 ms measured against a 4 ms memory floor); a replayed graph
launches them all at once.

A graph is captured per batch bucket (1, 2, 4, ...) and number of key ranges (DCA leaves out the
ranges that are empty for the whole batch: 1 up to one DCA chunk, then 2, then 3) over static
buffers: token ids, positions, and the metadata's ``DecodeInputs`` (block tables sized for
max_model_len, cache slots, key ranges, YaRN factors). A step copies the values that the model
runner built for it into the first n rows; padding rows read nothing (empty key ranges) and write
their keys into one reserved pad block.
The graph covers the model and the lm_head, so a replay yields logits [bucket, vocab].
"""

from __future__ import annotations

import logging

import torch

from qwen1m.attention.metadata import AttentionMetadata, DecodeInputs, SequenceSlice
from qwen1m.cache.paged_kv import PagedKVCache, SequenceBlocks

logger = logging.getLogger(__name__)


class _Graph:
    def __init__(self, runner: DecodeGraphRunner, bucket: int, num_ranges: int):
        dev, model = runner.device, runner.model
        self.ids = torch.zeros(bucket, dtype=torch.long, device=dev)
        self.positions = torch.ones(bucket, dtype=torch.long, device=dev)
        pad = SequenceBlocks(runner.kv_cache, [runner.pad_block], dev)
        # placeholder slices: only their count, num_query == 1 / num_cached > 0 and the cache matter
        seqs = [SequenceSlice(i, 1, 1, 2, pad, 1) for i in range(bucket)]
        self.inputs = DecodeInputs(
            rows=torch.arange(bucket, device=dev),
            tables=torch.zeros(bucket, runner.max_blocks, dtype=torch.int32, device=dev),
            slots=torch.full((bucket,), runner.pad_slot, dtype=torch.long, device=dev),
            bounds=torch.zeros(2, num_ranges, bucket, dtype=torch.int32, device=dev),
            scale=torch.ones(bucket, 1, 1, dtype=runner.dtype, device=dev),
        )
        self.meta = AttentionMetadata(self.positions, seqs, decode=self.inputs)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # compile Triton kernels and settle allocations outside the capture
                self._forward(model)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.pool), torch.inference_mode():
            self.logits = self._forward(model)

    def _forward(self, model) -> torch.Tensor:
        return model.compute_logits(model(self.ids, self.meta))

    def fill(self, ids: list[int], fresh: DecodeInputs, positions: list[int], pad_slot: int,
             device_ids: torch.Tensor | None = None) -> None:
        n = len(ids)
        if device_ids is not None:  # an overlapped step: the previous step's tokens, still on the GPU
            self.ids[:n].copy_(device_ids)
        else:
            self.ids[:n].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        width = fresh.tables.shape[1]
        self.inputs.tables[:n, :width].copy_(fresh.tables)
        self.inputs.tables[:n, width:].zero_()
        self.inputs.slots[:n].copy_(fresh.slots)
        self.inputs.slots[n:].fill_(pad_slot)
        self.inputs.bounds[:, :, :n].copy_(fresh.bounds)
        self.inputs.bounds[:, :, n:].zero_()  # padding rows: empty key ranges
        self.inputs.scale[:n].copy_(fresh.scale)


class DecodeGraphRunner:
    """Replays captured decode steps (the model runner dispatches the steps that ``fits``)."""

    def __init__(self, model, kv_cache: PagedKVCache, pad_block: int, max_batch: int, max_model_len: int):
        self.model, self.kv_cache, self.pad_block = model, kv_cache, pad_block
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.pad_slot = pad_block * kv_cache.block_size
        self.max_blocks = -(-max_model_len // kv_cache.block_size)
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch} | {max_batch})
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def fits(self, seqs: list[SequenceSlice]) -> bool:
        """Whether a decode step of these sequences fits a bucket (and the static block tables)."""
        return len(seqs) <= self.buckets[-1] and all(len(s.cache.blocks) <= self.max_blocks for s in seqs)

    def run(self, ids: list[int], seqs: list[SequenceSlice], fresh: DecodeInputs,
            device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the step's graph (captured on first use): logits [len(seqs), vocab]. ``fits(seqs)``
        must hold; fresh: the step's decode inputs (``ModelRunner.decode_inputs``)."""
        n = len(seqs)
        bucket = next(b for b in self.buckets if b >= n)
        key = (bucket, fresh.bounds.shape[1])
        if key not in self.graphs:
            logger.info("capturing a CUDA graph for decode batch %d, %d key ranges", *key)
            self.graphs[key] = _Graph(self, *key)
        graph = self.graphs[key]
        graph.fill(ids, fresh, [s.num_cached for s in seqs], self.pad_slot, device_ids)
        graph.graph.replay()
        return graph.logits[:n]
