"""What a persisted KV block's bytes depend on, besides its tokens: the cache's identity.

A block's chained key (``prefix_cache.py``) names its tokens; its bytes also depend on the model (its
config and weights), the compute dtype, the KV dtype (FP8 or not), the block size, DCA and its YaRN
training length, the sparse prefill config (it changes the hidden states, hence the KV of every layer
after the first), and, under tensor parallelism, which KV heads this rank holds. These settings are
hashed into an identity; the disk tier keeps each identity's files in its own folder
``DIR/<identity>/`` with a ``manifest.json`` of the settings, so a cache made under other settings is
never read (``disk_tier.py`` logs which settings differ).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

# bump when the file layout or the meaning of a block's bytes changes: old caches are then ignored
FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def model_fingerprint(folder: Path, load_format: str) -> str:
    """sha256 of config.json and of the weight files' names, sizes and mtimes (not their content:
    hashing 15 GB at every start would cost a minute; a copied checkpoint gets a new mtime and so a
    new cache, which is safe). Dummy weights are seeded (``init_dummy_weights``): the format names them."""
    h = hashlib.sha256()
    config = folder / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    h.update(load_format.encode())
    if load_format != "dummy":
        for f in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def cache_settings(*, folder: Path, load_format: str, dtype: torch.dtype, fp8: bool, block_size: int,
                   dca, sparse, tp_size: int, tp_rank: int, fingerprint: str | None = None,
                   attention_fp8: bool = False) -> dict:
    """Every setting that changes a block's KV bytes, as plain JSON data (the manifest)."""
    sparse_hash = None
    if sparse is not None:
        sparse_hash = hashlib.sha256(json.dumps(asdict(sparse), sort_keys=True, default=str).encode()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "model": fingerprint if fingerprint is not None else model_fingerprint(folder, load_format),
        "model_folder": str(folder),  # informative only: not hashed (a moved folder keeps its cache)
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_dtype": "fp8_e4m3" if fp8 else "auto",
        # FP8 attention changes every later layer's hidden states, so their K/V bytes
        "attention_dtype": "fp8" if attention_fp8 else "auto",
        "block_size": block_size,
        "dca": asdict(dca) if dca is not None else None,  # chunk sizes and the YaRN training length
        "sparse": sparse_hash,
        "tensor_parallel_size": tp_size,
        "tensor_parallel_rank": tp_rank,
    }


def identity(settings: dict) -> str:
    """The folder name of a settings dict: 24 hex digits of its sha256 (``model_folder`` left out)."""
    hashed = {k: v for k, v in settings.items() if k != "model_folder"}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:24]


def differing(ours: dict, theirs: dict) -> list[str]:
    """The hashed settings that differ between two manifests (for the log line)."""
    keys = sorted((set(ours) | set(theirs)) - {"model_folder"})
    return [k for k in keys if ours.get(k) != theirs.get(k)]
