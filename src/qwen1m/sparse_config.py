"""Sparse-prefill configuration: per-head vertical/slash budgets and the thresholds of the method.

The budgets come from ``sparse_attention_config.json`` in the Qwen/MInference format: a list with one
entry per layer, each a dict keyed by the head index as a string, each value
``[pattern, vertical_size, slash_size, score]``, e.g. ``{"0": ["vertical_and_slash", 1000, 6096, 0.93]}``.
Only the ``vertical_and_slash`` pattern exists in the released configs (design §1.2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen1m.errors import ConfigError

PATTERN = "vertical_and_slash"


@dataclass(frozen=True, slots=True)
class SparseConfig:
    """Per-layer, per-head budgets plus the method's constants (each with its source)."""

    vertical_sizes: tuple[tuple[int, ...], ...]  # [layer][head]: key columns kept (top-k of column sums)
    slash_sizes: tuple[tuple[int, ...], ...]  # [layer][head]: diagonals kept (top-k of diagonal sums)
    scores: tuple[tuple[float | None, ...], ...]  # [layer][head]: recall measured by calibration, if any
    threshold: int = 32768  # sparse only for prompts longer than this (vLLM sparse_attention_threshold)
    last_q: int = 64  # queries at the end of each piece that estimate the pattern (vLLM/MInference)
    sink_tokens: int = 30  # first key columns always kept (MInference: vertical[..., :30] = inf)
    local_diagonals: int = 100  # nearest diagonals always kept (MInference online path: slash[..., -100:])
    block_size: int = 64  # query/key block of the index conversion (BLOCK_M = BLOCK_N = 64, design §3.3)
    empty_region_columns: int = 5  # a DCA region that gets no index keeps this many even columns (vLLM)
    vertical_remap: tuple[tuple[int, int], ...] = ((30, 130),)  # vLLM bumps vertical_size 30 to 130
    # A region whose index lists more than this share of its visible query-key pairs is attended by
    # the dense kernel instead (same keys and more: exact attention, and faster there). On the H200
    # the sparse kernel ran at ~340 TFLOP/s of computed pairs against cuDNN's ~550 (bench_sparse,
    # benchmarks/results/sparse_2026-11-29.json), so past ~60% density dense is the faster way; a
    # 128K prompt with the 7B budgets lists ~86%. 1.0 keeps every region sparse (the method alone).
    # Under tensor parallelism each rank decides from its own heads.
    dense_above_density: float = 0.6
    # A layer whose regions all went dense in a prefill step skips the sparse path (estimate, index)
    # in the next steps of that prompt and runs dense DCA (cuDNN on CUDA), until its keys have grown
    # past this factor of the keys it was measured at; then it measures again. Budgets are fixed, so
    # density falls as keys grow: the hint errs toward dense (exact, never slower than dense).
    # 0 measures every step (``attention/dense_hint.py``).
    dense_hint_growth: float = 4.0

    def __post_init__(self) -> None:
        for name in ("threshold", "last_q", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sparse config field '{name}' must be positive, got {getattr(self, name)}.")
        if not 0.0 < self.dense_above_density <= 1.0:
            raise ConfigError("sparse config field 'dense_above_density' must be in (0, 1] (1 keeps every "
                              f"region sparse), got {self.dense_above_density}.")
        if self.dense_hint_growth != 0 and self.dense_hint_growth < 1:
            raise ConfigError("sparse config field 'dense_hint_growth' must be 0 (off) or >= 1, got "
                              f"{self.dense_hint_growth}.")
        for name in ("sink_tokens", "local_diagonals", "empty_region_columns"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sparse config field '{name}' must be >= 0, got {getattr(self, name)}.")

    @property
    def num_layers(self) -> int:
        return len(self.vertical_sizes)

    def budgets(self, layer: int) -> tuple[list[int], list[int]]:
        """(vertical sizes, slash sizes) of one layer's heads, with vLLM's remap applied."""
        remap = dict(self.vertical_remap)
        return [remap.get(v, v) for v in self.vertical_sizes[layer]], list(self.slash_sizes[layer])

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, vertical: int, slash: int, **kwargs: Any) -> SparseConfig:
        v = tuple(tuple([vertical] * num_heads) for _ in range(num_layers))
        s = tuple(tuple([slash] * num_heads) for _ in range(num_layers))
        scores = tuple(tuple([None] * num_heads) for _ in range(num_layers))
        return cls(v, s, scores, **kwargs)

    def to_json(self) -> list[dict[str, list[Any]]]:
        """The Qwen/MInference file format (score written only where measured)."""
        out = []
        for vs, ss, scores in zip(self.vertical_sizes, self.slash_sizes, self.scores):
            out.append({str(h): [PATTERN, v, s, (round(sc, 4) if sc is not None else 1.0)]
                        for h, (v, s, sc) in enumerate(zip(vs, ss, scores))})
        return out


def parse_sparse_config(data: Any, num_layers: int, num_heads: int, where: str, **kwargs: Any) -> SparseConfig:
    if not isinstance(data, list):
        raise ConfigError(f"{where} must hold a JSON list with one entry per layer, got {type(data).__name__}.")
    if len(data) != num_layers:
        raise ConfigError(f"{where} has {len(data)} layer entries but the model has {num_layers} layers.")
    vertical, slash, scores = [], [], []
    for layer, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} layer {layer} must be an object keyed by head index.")
        heads = {}
        for key, value in entry.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < num_heads):
                raise ConfigError(f"{where} layer {layer} has head key {key!r}; expected '0'..'{num_heads - 1}'.")
            heads[int(key)] = value
        missing = [h for h in range(num_heads) if h not in heads]
        if missing:
            raise ConfigError(f"{where} layer {layer} has no entry for head {missing[0]}.")
        lv, ls, lsc = [], [], []
        for h in range(num_heads):
            value = heads[h]
            at = f"{where} layer {layer} head {h}"
            if not isinstance(value, list) or len(value) < 3:
                raise ConfigError(f"{at} must be [pattern, vertical_size, slash_size, score], got {value!r}.")
            if value[0] != PATTERN:
                raise ConfigError(f"{at} has pattern {value[0]!r}; only '{PATTERN}' is supported.")
            for field_name, x in (("vertical_size", value[1]), ("slash_size", value[2])):
                if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                    raise ConfigError(f"{at} field {field_name} must be a non-negative integer, got {x!r}.")
            score = value[3] if len(value) > 3 else None
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                      or not math.isfinite(score)):
                raise ConfigError(f"{at} field score must be a number, got {score!r}.")
            lv.append(value[1])
            ls.append(value[2])
            lsc.append(float(score) if score is not None else None)
        vertical.append(tuple(lv))
        slash.append(tuple(ls))
        scores.append(tuple(lsc))
    return SparseConfig(tuple(vertical), tuple(slash), tuple(scores), **kwargs)


def load_sparse_config(path: str | Path, num_layers: int, num_heads: int, **kwargs: Any) -> SparseConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sparse attention config {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}.") from None
    return parse_sparse_config(data, num_layers, num_heads, str(path), **kwargs)
