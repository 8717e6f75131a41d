"""Paged KV cache: per-layer block storage, per-sequence block tables, optional FP8 (e4m3).

Layout per layer (one tensor each for K and V):

    cache[layer]: [num_blocks, block_size, num_kv_heads, head_dim]

Logical token t of a sequence lives in block ``block_table[t // block_size]`` at row
``t % block_size``. Keys are stored already rotated (and YaRN-scaled under DCA).

FP8: values are stored as float8_e4m3fn (kept in uint8 storage: CPU index ops do not take float8)
with one float32 scale per (token, kv head): scale = amax(|x|) / 448. A per-token scale needs no
calibration and survives Qwen's large key biases; it adds 4 bytes per 128 one-byte values (3%).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_DTYPE = torch.float8_e4m3fn


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [n, num_kv_heads, head_dim] -> (uint8 view of e4m3 values, scale [n, num_kv_heads] float32)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-12)
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(torch.uint8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_fp8: q uint8 [..., head_dim], scale [...] -> values in ``dtype``."""
    return (q.view(FP8_DTYPE).float() * scale[..., None]).to(dtype)


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        fp8: bool = False,
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype = dtype  # the compute dtype values are returned in
        self.fp8 = fp8
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        store = torch.uint8 if fp8 else dtype
        # torch.empty: on CPU pages are committed only when written; slots are never read before written
        self.k = [torch.empty(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=store, device=device) for _ in range(num_layers)]
        if fp8:
            sshape = (num_blocks, block_size, num_kv_heads)
            self.k_scale = [torch.empty(sshape, dtype=torch.float32, device=device) for _ in range(num_layers)]
            self.v_scale = [torch.empty(sshape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        else:
            self.k_scale = self.v_scale = None

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, fp8: bool) -> int:
        elem = 1 if fp8 else torch.empty((), dtype=dtype).element_size()
        scales = 2 * num_layers * num_kv_heads * 4 if fp8 else 0
        return 2 * num_layers * num_kv_heads * head_dim * elem + scales

    def kernel_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(k, v, k_scale, v_scale) of one layer as kernels read them (float8 dtype under FP8)."""
        if self.fp8:
            return (self.k[layer].view(FP8_DTYPE), self.v[layer].view(FP8_DTYPE),
                    self.k_scale[layer], self.v_scale[layer])
        return self.k[layer], self.v[layer], None, None


def write_slots(cache: PagedKVCache, layer: int, slots: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v ([n, num_kv_heads, head_dim]) at flat cache rows ``slots``: an index tensor [n] (one
    scatter, e.g. a decode batch) or a slice (contiguous rows: a plain copy)."""
    kf = cache.k[layer].view(-1, cache.num_kv_heads, cache.head_dim)
    vf = cache.v[layer].view(-1, cache.num_kv_heads, cache.head_dim)
    if cache.fp8:
        (kq, ks), (vq, vs) = quantize_fp8(k), quantize_fp8(v)
        kf[slots], vf[slots] = kq, vq
        cache.k_scale[layer].view(-1, cache.num_kv_heads)[slots] = ks
        cache.v_scale[layer].view(-1, cache.num_kv_heads)[slots] = vs
    else:
        kf[slots], vf[slots] = k, v


class SequenceBlocks:
    """One sequence's blocks in a PagedKVCache; the handle the attention backends use."""

    def __init__(self, cache: PagedKVCache, blocks: list[int], device: torch.device):
        self.cache = cache
        self.device = device
        self.blocks: list[int] = []
        self.first_block: int | None = None
        self.extend(blocks)

    def extend(self, blocks: list[int]) -> None:
        """Append blocks (a sequence grows one block at a time as it generates)."""
        # contiguous block ids -> the sequence's keys are one strided view: prefill reads need no gather
        contiguous = blocks == list(range(blocks[0], blocks[0] + len(blocks))) if blocks else True
        if not self.blocks:
            self.first_block = blocks[0] if blocks and contiguous else None
        elif self.first_block is not None and not (contiguous and blocks and blocks[0] == self.blocks[-1] + 1):
            self.first_block = None
        self.blocks = self.blocks + blocks
        self.capacity = len(self.blocks) * self.cache.block_size
        # rebuilt once per block_size tokens of growth, not per step
        self.block_table = torch.tensor(self.blocks, dtype=torch.int32, device=self.device)  # [num_blocks_of_seq]
        # host copy for building decode batches: converting a 1M-token sequence's 15,626-entry list
        # costs ~0.8 ms, too much for every decode step on a CPU core
        on_cpu = torch.device(self.device).type == "cpu"
        self.block_table_cpu = self.block_table if on_cpu else torch.tensor(self.blocks, dtype=torch.int32)

    def _rows(self, start: int, end: int) -> slice | torch.Tensor:
        """Flat row indices of tokens [start, end) in a layer's [num_blocks * block_size, ...] view:
        a slice (contiguous blocks: indexing gives views) or an index tensor (indexing gathers)."""
        bs = self.cache.block_size
        if self.first_block is not None:
            base = self.first_block * bs
            return slice(base + start, base + end)
        pos = torch.arange(start, end, device=self.block_table.device)
        return self.block_table[pos // bs].long() * bs + pos % bs

    def slot(self, position: int) -> int:
        """Flat cache row of one token position."""
        bs = self.cache.block_size
        return self.blocks[position // bs] * bs + position % bs

    def _flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        return (c.k[layer].view(-1, c.num_kv_heads, c.head_dim), c.v[layer].view(-1, c.num_kv_heads, c.head_dim))

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([n, num_kv_heads, head_dim]) at token positions [start, start + n)."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: writing up to token {end} into {self.capacity} reserved slots")
        write_slots(self.cache, layer, self._rows(start, end), k, v)

    def view_stored_fp8(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An FP8 cache's keys and values of tokens [0, end) as stored: (k e4m3, k scales, v e4m3, v
        scales), [end, num_kv_heads, head_dim] and [end, num_kv_heads]; views when the blocks are
        contiguous, else one gather. No dequantisation (FP8 attention reads these bytes directly)."""
        c, rows = self.cache, self._rows(0, end)
        if not c.fp8:
            raise ValueError("view_stored_fp8 needs an FP8 cache (kv_cache_dtype='fp8').")
        kf, vf = self._flat(layer)
        ks = c.k_scale[layer].view(-1, c.num_kv_heads)[rows]
        vs = c.v_scale[layer].view(-1, c.num_kv_heads)[rows]
        return kf[rows].view(FP8_DTYPE), ks, vf[rows].view(FP8_DTYPE), vs

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens [0, end) as [end, num_kv_heads, head_dim] in the compute dtype.

        A view when the blocks are contiguous and not FP8; otherwise one gather (and dequantize) of
        2 * end * num_kv_heads * head_dim elements for this layer.
        """
        c, rows = self.cache, self._rows(0, end)
        kf, vf = self._flat(layer)
        if not c.fp8:
            return kf[rows], vf[rows]
        ks = c.k_scale[layer].view(-1, c.num_kv_heads)[rows]
        vs = c.v_scale[layer].view(-1, c.num_kv_heads)[rows]
        return dequantize_fp8(kf[rows], ks, c.dtype), dequantize_fp8(vf[rows], vs, c.dtype)
