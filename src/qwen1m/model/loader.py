"""Build a model from a checkpoint folder: safetensors only, memory-mapped, one clear error per problem.

The model is constructed on the ``meta`` device (no memory, no random init), materialised empty on
the target device, then every parameter is filled straight from the memory-mapped safetensors file
in the requested dtype. Pickle-based ``*.bin`` / ``*.pt`` weights are refused: loading them can
execute code from the model folder.

A file that is not valid safetensors (truncated, empty, garbage), a tensor that is not floating-point
(qwen1m supports no quantised weight format: an int8 tensor would be silently cast) and a tensor
holding NaN or infinity are each refused with one sentence naming the file and tensor. The finiteness
check is one ``aminmax`` per tensor (NaN propagates into it), ~35 ms per GiB on the CPU here, against
~400 ms per GiB for the copy itself, and a single device sync for the whole model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwen1m.config import DCAConfig, ModelConfig
from qwen1m.errors import CheckpointError
from qwen1m.model.qwen2 import Qwen2ForCausalLM
from qwen1m.model.shard import TPShard
from qwen1m.model.wiring import ModelWiring
from qwen1m.sparse_config import SparseConfig

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Keys some exporters write that carry no learned state (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtype codes we load (and cast to the model dtype): floating point only
_FLOAT_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open`` whose failures (the header is checked against the file size on open) are one sentence."""
    try:
        handle = safe_open(str(path), framework="pt")
    except OSError as e:
        raise CheckpointError(f"{path} could not be read: {e.strerror or e}.") from None
    except SafetensorError as e:
        detail = str(e).removeprefix("Error while deserializing header: ")
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({detail}; the file has {size:,} bytes): it is truncated, "
            "empty or not safetensors, so download or export it again."
        ) from None
    with handle as f:
        yield f


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto'/None -> the checkpoint's dtype on GPU; float32 on CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise CheckpointError(f"dtype {dtype} is not supported (expected float32, bfloat16 or float16).")
        return dtype
    if dtype is None or dtype == "auto":
        return _DTYPES.get(cfg.torch_dtype, torch.bfloat16) if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype '{dtype}' is not supported (expected float32, bfloat16 or float16).")
    return _DTYPES[dtype]


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                f"{index} is not a valid safetensors index (expected a 'weight_map' object of tensor names to "
                "file names)."
            ) from None
        files = {name: folder / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index} lists the shard '{path.name}', which is missing from {folder}.")
        return files
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); qwen1m loads safetensors only "
            "because pickle files can run code: convert them to model.safetensors first."
        )
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json.")


def build_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, dca: DCAConfig | None = None,
    sparse: SparseConfig | None = None, wiring: ModelWiring | None = None,
) -> Qwen2ForCausalLM:
    """Uninitialised model (weights allocated on ``device``, contents undefined); wiring: see ModelWiring."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype: no float32 detour
    try:
        with torch.device("meta"):
            model = Qwen2ForCausalLM(cfg, dca=dca, sparse=sparse, wiring=wiring)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_weights(model: Qwen2ForCausalLM, folder: Path, shard: TPShard | None = None) -> None:
    """Fill the parameters from the checkpoint; with ``shard``, read only the rank's slices."""
    files = weight_files(folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if tied:
        names.discard("lm_head.weight")  # some exporters save the tied copy too; it is the embedding
    missing = sorted(expected - names)
    if missing:
        raise CheckpointError(
            f"Checkpoint {folder} is missing the tensor '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" that the config ({model.config.architecture}) requires."
        )
    unexpected = sorted(names - expected)
    if unexpected:
        raise CheckpointError(
            f"Checkpoint file {files[unexpected[0]]} has the unexpected tensor '{unexpected[0]}'"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f", which {model.config.architecture} with this config.json does not use."
        )
    by_file: dict[Path, list[str]] = {}
    for name in sorted(expected):
        by_file.setdefault(files[name], []).append(name)
    loaded: list[tuple[str, Path, torch.dtype]] = []
    extrema: list[torch.Tensor] = []  # per tensor [min, max] on the device: one sync at the end
    with torch.no_grad():
        for path, tensor_names in by_file.items():
            with open_safetensors(path) as f:
                held = set(f.keys())
                for name in tensor_names:
                    if name not in held:  # a hand-edited or stale index
                        raise CheckpointError(f"{folder / 'model.safetensors.index.json'} maps the tensor '{name}' "
                                              f"to {path.name}, which does not hold it.")
                    param = params[name]
                    view = f.get_slice(name)
                    shape = tuple(view.get_shape())
                    code = view.get_dtype()
                    if code not in _FLOAT_CODES:
                        raise CheckpointError(
                            f"Tensor '{name}' in {path} has dtype {code}; qwen1m loads floating-point weights "
                            f"only ({', '.join(_FLOAT_CODES)}) and no quantised format."
                        )
                    dim = shard.split_dim(name) if shard is not None else None
                    expected = list(param.shape)
                    if dim is not None:
                        expected[dim] *= shard.size
                    if shape != tuple(expected):
                        raise CheckpointError(
                            f"Tensor '{name}' in {path} has shape {list(shape)} but the config expects "
                            f"{expected}."
                        )
                    if dim is None:
                        tensor = f.get_tensor(name)
                    else:  # read only this rank's rows (dim 0) or columns (dim 1) from the mapped file
                        lo, hi = shard.bounds(shape[dim])
                        tensor = view[lo:hi] if dim == 0 else view[:, lo:hi]
                    param.copy_(tensor.to(param.dtype))
                    if param.numel():
                        extrema.append(torch.stack(torch.aminmax(param)).float())
                        loaded.append((name, path, param.dtype))
    _check_finite(loaded, extrema)


def _check_finite(loaded: list[tuple[str, Path, torch.dtype]], extrema: list[torch.Tensor]) -> None:
    """Refuse the first tensor holding NaN or +-inf (the model would output garbage, e.g. token 0 only)."""
    if not extrema:
        return
    finite = torch.isfinite(torch.stack(extrema)).all(dim=1).tolist()
    if all(finite):
        return
    name, path, dtype = loaded[finite.index(False)]
    with open_safetensors(path) as f:
        values = f.get_tensor(name)
    count = int((~torch.isfinite(values)).sum())
    if count:
        raise CheckpointError(
            f"Tensor '{name}' in {path} holds {count:,} NaN or infinite value(s) out of {values.numel():,}: "
            "the checkpoint is corrupt."
        )
    largest = values.abs().max().item()
    raise CheckpointError(
        f"Tensor '{name}' in {path} has values up to {largest:.4g}, beyond the range of "
        f"{str(dtype).removeprefix('torch.')}; load the model with dtype='bfloat16' or 'float32'."
    )


def init_dummy_weights(model: Qwen2ForCausalLM, seed: int = 0) -> None:
    """Random weights for speed runs (vLLM's load_format='dummy'): values do not affect timing."""
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def load_model(
    folder: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "safetensors",
    dca: DCAConfig | None = None,
    sparse: SparseConfig | None = None,
    shard: TPShard | None = None,
    wiring: ModelWiring | None = None,
) -> Qwen2ForCausalLM:
    """Build and fill the model; with ``shard``, ``cfg`` is the rank-local config (model.shard).
    wiring: the collectives, kernel choice and reports the model is built with (``ModelWiring``)."""
    folder = Path(folder)
    if load_format not in ("safetensors", "auto", "dummy"):
        raise CheckpointError(f"load_format '{load_format}' is not supported (expected 'safetensors' or 'dummy').")
    model = build_model(cfg, dtype, device, dca=dca, sparse=sparse, wiring=wiring)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, folder, shard)
    model.fuse_projections()
    return model
