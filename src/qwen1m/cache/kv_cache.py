"""KV cache storage.

``SequenceKVCache`` holds one sequence's keys and values contiguously per layer, sized once for
the sequence's final length (prompt + max new tokens), so no step reallocates. Keys are stored
already rotated (and YaRN-scaled under DCA): decode never re-rotates the past.
"""

from __future__ import annotations

import torch


class SequenceKVCache:
    """k[layer], v[layer]: [capacity, num_kv_heads, head_dim]; tokens [0, length) are valid."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (capacity, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([n, num_kv_heads, head_dim]) at token slots [start, start + n)."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: writing up to token {end} into capacity {self.capacity}")
        self.k[layer][start:end] = k
        self.v[layer][start:end] = v

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens [0, end) (views, no copy)."""
        return self.k[layer][:end], self.v[layer][:end]
