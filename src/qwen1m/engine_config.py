"""The engine's options, written once: ``EngineConfig``, a frozen dataclass validated when it is made.

``LLM(model, **options)`` takes exactly these fields as keywords, every CLI command that loads a
model adds them with ``EngineConfig.add_cli_args(parser)`` and reads them back with
``EngineConfig.from_cli_args(args)`` (vLLM's ``EngineArgs`` pattern), and the engine builder turns
one into a ``BuildSpec`` (``engine.builder.build_spec``). Each default is written here and nowhere
else. Checks that need the checkpoint (DCA against ``max_position_embeddings``, the block size
against the DCA chunk, the sparse config's shape, heads divisible by the tensor-parallel size) are
made where the checkpoint is read, in ``build_spec``.

This module does not import torch, so that ``qwen1m --help`` stays light: ``dtype`` and ``device``
are kept as strings (a ``torch.dtype`` or ``torch.device`` given from Python becomes its name) and
are turned into torch objects where the engine is built.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qwen1m.config import DCAConfig
from qwen1m.errors import ConfigError
from qwen1m.sparse_config import SparseConfig

LOAD_FORMATS = ("auto", "safetensors", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8")
ATTENTION_DTYPES = ("auto", "fp8")

# CLI argument groups of the options that have one (the rest sit with the command's own flags)
_GROUPS = {
    "dca": "dual chunk attention (default: as the checkpoint's config.json says)",
    "sparse": "sparse prefill (default: the folder's sparse_attention_config.json if present)",
}


def _default(cls, name: str) -> Any:
    """A dataclass field's default, for help text that quotes it (slots hide it from the class)."""
    return next(f.default for f in fields(cls) if f.name == name)


def _option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
            group: str | None = None):
    """A field with its CLI spelling: ``flag`` defaults to --the-field-name; ``help`` is the CLI's
    one line (the help formatter appends the default)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "group": group})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Every option of ``LLM(model, **options)``.

    model: a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json, ...), or a
        Hub ID such as "Qwen/Qwen2.5-7B-Instruct-1M" (from the hub cache, else downloaded if
        HF_HUB_OFFLINE is not set: configs, tokenizer and safetensors only; ``qwen1m.hub``);
        None loads the bundled model. Its generation_config.json gives the default sampling.
    dtype: "auto" (checkpoint dtype on GPU, float32 on CPU), "float32", "bfloat16", "float16"
        (or a torch.dtype, kept as its name).
    device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N" (or a torch.device).
    load_format: "auto"/"safetensors", or "dummy" for random weights (benchmarks; config.json only).
    dca: "auto" uses the checkpoint's ``dual_chunk_attention_config``; a ``DCAConfig`` turns DCA on
        for any model (e.g. a 32K-trained Qwen2.5 stretched to 128K+); None or False turns it off.
    max_model_len: longest prompt + output; defaults to ``max_position_embeddings`` (lowered to what
        fits in memory when not given explicitly; an explicit value that does not fit is refused).
    max_num_batched_tokens: tokens per engine step (the prefill chunk; the report uses 32768).
    max_num_seqs: sequences the engine runs at once; more wait in the queue.
    kv_cache_dtype: "auto" (the model dtype) or "fp8" (e4m3 with per-token, per-head scales).
    attention_dtype: "auto" (the model dtype) or "fp8": prefill attention on FP8 tensor cores (q, k, v
        in e4m3 with per-token, per-head scales, P in e4m3; an FP8 KV cache is read as stored). Dense
        prefill only (sparse regions, decode: the model dtype); a kernel on CUDA, on CPU the input
        rounding is emulated (``attention/fp8.py``). Off by default: its accuracy is in docs/results.md.
    block_size: KV block size in tokens (default 64, or the largest power of two <= 64 dividing the
        DCA chunk length chunk_size - local_size, which must be a multiple of it).
    gpu_memory_utilization: share of the GPU's memory the engine plans to use.
    kv_cache_memory: bytes for the KV cache, overriding the plan (CPU default: min(25% of RAM,
        max_model_len * min(max_num_seqs, 8) tokens)).
    sparse_attention_config: "auto" uses the folder's ``sparse_attention_config.json`` if present; a
        path or a ``SparseConfig`` turns sparse prefill on; None or False turns it off.
    sparse_threshold: sparse prefill only for prompts longer than this (default 32768, or the
        checkpoint's ``dual_chunk_attention_config.sparse_attention_threshold``).
    sparse_dense_above: a prefill region whose sparse index lists more than this share of its
        query-key pairs runs dense attention instead (default 0.6, where the dense kernel is faster;
        1.0 keeps every region sparse).
    sparse_telemetry: record the computed density and, on one GQA group, the attention recall of
        sparse prefill (``llm.sparse_report()``); costs an extra dense pass over those heads.
    tensor_parallel_size: split heads and MLP over this many processes/GPUs (torch.distributed:
        NCCL on GPUs, gloo on CPU). qwen1m starts the workers itself as ``python -m
        qwen1m.parallel.worker`` processes, which never import the caller's ``__main__`` (so a script
        without a main guard, stdin, ``python -c`` and notebooks all work). Rank r runs on cuda:r;
        the environment variable QWEN1M_TP_DEVICES (one CUDA index per rank, e.g. "0,0") places ranks
        elsewhere, and ranks sharing a GPU join over gloo and each plan for their share of its memory
        (kv_cache_memory, when given, is per rank). Under ``torchrun`` with as many processes, rank 0
        returns the LLM and the other ranks serve it inside this constructor, then exit with status 0
        (without running the rest of the script or its atexit handlers). TP steps run eagerly.
    enforce_eager: on a GPU, decode steps replay CUDA graphs unless this is True.
    enable_prefix_caching: keep prompts' full KV blocks after their requests and start a later
        prompt that begins with the same tokens from them (another question about the same document:
        only the question is prefilled). Reuse is exact in float32; with DCA's YaRN temperature it
        needs prompt lengths within ~1% of each other (``cache/prefix_cache.py``).
    seed: seeds torch's global generator: random ("dummy") weights and requests without a seed of
        their own.
    cpu_offload_gb: a host-memory tier of this many GB under the prefix cache (pinned on CUDA):
        blocks are copied there as they are computed, so evicting them from the GPU keeps them, and
        a later prompt loads them instead of computing them (``cache/kv_tiers.py``). Turns prefix
        caching on. Under tensor parallelism the size is per rank: each rank keeps its own KV heads'
        copies (``parallel/tier_sync.py``).
    prefix_cache_dir: a disk tier in this folder: a request's full prompt blocks are written there
        after it ends, by a background thread, and read back by any later LLM (another process, after
        a restart) made with the same model and KV settings; files carry checksums, a bad one is
        recomputed. Turns prefix caching on (with a 2 GB host tier as its staging area unless
        cpu_offload_gb says otherwise). prefix_cache_max_gb caps the folder (least recently read
        files out first). Under tensor parallelism each rank writes its own shard's files (one
        subfolder per rank, read back by an LLM of the same tensor_parallel_size); a block missing or
        bad on any rank is recomputed on all of them; the cap counts every rank's files.
    """

    model: str | Path | None = _option(
        None, "checkpoint folder, or a Hugging Face Hub ID such as Qwen/Qwen2.5-7B-Instruct-1M (from the hub "
              "cache, else downloaded: config, tokenizer and safetensors files only; default: the bundled model)")
    dtype: str = _option("auto", "auto, float32, bfloat16 or float16")
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    load_format: str = _option("auto", "dummy: random weights (config.json only; for speed runs)",
                               choices=LOAD_FORMATS)
    dca: DCAConfig | str | bool | None = _option("auto", "", group="dca")  # its flags: _add_dca_args
    max_model_len: int | None = _option(None, "longest prompt + output in tokens")
    max_num_batched_tokens: int = _option(32768, "tokens per engine step")
    max_num_seqs: int = _option(64, "sequences the engine runs at once (one per completion: n=4 counts 4); "
                                    "more wait")
    kv_cache_dtype: str = _option("auto", "fp8 halves KV memory", choices=KV_CACHE_DTYPES)
    attention_dtype: str = _option("auto", "fp8: dense prefill attention on FP8 tensor cores (e4m3 q/k/v/P)",
                                   choices=ATTENTION_DTYPES)
    block_size: int | None = _option(None, "KV cache block size in tokens")
    gpu_memory_utilization: float = _option(0.9, "share of GPU memory to plan for")
    kv_cache_memory: int | None = _option(None, "bytes for the KV cache (overrides the plan)")
    sparse_attention_config: str | Path | SparseConfig | bool | None = _option(
        "auto", "a sparse_attention_config.json, 'auto' or 'none'", flag="--sparse-config", group="sparse")
    sparse_threshold: int | None = _option(None, "sparse only above this prompt length", group="sparse")
    sparse_dense_above: float | None = _option(
        None, "a region whose index lists more than this share of its pairs runs dense (default "
              f"{_default(SparseConfig, 'dense_above_density')}; 1 keeps every region sparse)",
        group="sparse")
    sparse_telemetry: bool = _option(False, "record sparse prefill's density and recall (generate -v prints them; "
                                            "an extra dense pass over one head group)", group="sparse")
    tensor_parallel_size: int = _option(1, "split the model over N processes/GPUs")
    enforce_eager: bool = _option(False, "no CUDA graphs for decode")
    enable_prefix_caching: bool = _option(False, "reuse the KV blocks of earlier prompts that share this "
                                                 "prompt's beginning")
    # --seed is each command's own (sampling, or the generated inputs), as it was before this existed
    seed: int = _option(0, "seed of torch's global generator: random (dummy) weights and requests without "
                           "a seed of their own", flag="--engine-seed")
    cpu_offload_gb: float | None = _option(None, "host-memory tier of this many GB under the prefix cache "
                                                 "(turns it on)")
    prefix_cache_dir: str | Path | None = _option(
        None, "disk tier of the prefix cache in this folder: a document is prefilled once, across processes "
              "and restarts (turns prefix caching on)")
    prefix_cache_max_gb: float | None = _option(None, "size cap of --prefix-cache-dir (least recently read "
                                                      "files go first)")

    def __post_init__(self) -> None:
        for name in ("dtype", "device"):  # torch objects become their names (this module avoids torch)
            value = getattr(self, name)
            if type(value).__module__ == "torch":
                object.__setattr__(self, name, str(value).removeprefix("torch."))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        self._check_values()

    def _check_values(self) -> None:
        if not (self.dca in ("auto", None, False) or isinstance(self.dca, DCAConfig)):
            raise ConfigError(f"dca must be 'auto', None/False or a DCAConfig, got {self.dca!r}.")
        if self.sparse_attention_config is True:
            raise ConfigError("sparse_attention_config must be 'auto', a path, a SparseConfig or None/False, "
                              "got True.")
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _check_choice("attention_dtype", self.attention_dtype, ATTENTION_DTYPES)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}.")
        for name in ("max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}.")
        if self.cpu_offload_gb is not None and self.cpu_offload_gb < 0:
            raise ConfigError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb}.")
        if self.prefix_cache_max_gb is not None:
            if self.prefix_cache_dir is None:
                raise ConfigError("prefix_cache_max_gb needs prefix_cache_dir.")
            if self.prefix_cache_max_gb <= 0:
                raise ConfigError(f"prefix_cache_max_gb must be positive, got {self.prefix_cache_max_gb}.")

    def options(self) -> dict[str, Any]:
        """The fields as ``LLM`` keyword arguments (nested configs kept whole, unlike ``dataclasses.asdict``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes``, validated again."""
        return replace(self, **changes)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, exclude: Collection[str] = ()) -> None:
        """Add a flag for every field but those in ``exclude`` (a command that sets them itself)."""
        groups: dict[str | None, Any] = {None: parser}
        for f in fields(cls):
            if f.name in exclude:
                continue
            group = f.metadata["group"]
            if group not in groups:
                groups[group] = parser.add_argument_group(_GROUPS[group])
            if f.name == "dca":
                _add_dca_args(groups[group])
                continue
            kind = _cli_type(f.name)
            if kind is bool:  # a switch: present turns the option on (every bool option defaults to off)
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                groups[group].add_argument(_flag(f), action=action, default=f.default, help=f.metadata["help"])
            else:
                groups[group].add_argument(_flag(f), type=kind, default=f.default, choices=f.metadata["choices"],
                                           help=f.metadata["help"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The config the flags of ``add_cli_args`` describe; ``overrides`` replace fields (their flags
        are not read, so a command may exclude them)."""
        values = {}
        for f in fields(cls):
            if f.name in overrides:
                continue
            if f.name == "dca":
                values[f.name] = _dca_from_cli(args)
            elif f.name == "sparse_attention_config":
                given = getattr(args, _dest(f))
                values[f.name] = None if given == "none" else given
            else:
                values[f.name] = getattr(args, _dest(f))
        return cls(**values, **overrides)


ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))


def _flag(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _dest(f) -> str:
    return _flag(f).removeprefix("--").replace("-", "_")


def _hint(name: str):
    """The field's annotation as a runtime type (``int | None`` etc.: isinstance takes unions)."""
    return _HINTS[name]


def _cli_type(name: str) -> type:
    """The argparse type of a field: bool (a switch) for a plain bool, else the first of int, float,
    str its annotation names (a path or a SparseConfig is given as a string on the command line)."""
    hint = _hint(name)
    if hint is bool:
        return bool
    members = typing.get_args(hint) or (hint,)
    return next(t for t in (int, float, str) if t in members)


def _check_type(name: str, value: Any) -> None:
    hint = _hint(name)
    members = typing.get_args(hint) or (hint,)
    ok = isinstance(value, hint)
    if isinstance(value, bool) and bool not in members:  # bool is an int to isinstance, not to a reader
        ok = False
    if isinstance(value, int) and not isinstance(value, bool) and float in members:  # 1 is a fine 1.0
        ok = True
    if not ok:
        names = ["None" if t is type(None) else t.__name__ for t in members]
        expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")


def _add_dca_args(group) -> None:
    group.add_argument("--dca-chunk-size", type=int, default=None, help="turn DCA on with this chunk_size")
    group.add_argument("--dca-local-size", type=int, default=None, help="DCA local_size (default chunk/32)")
    group.add_argument("--dca-original-max-position-embeddings", type=int, default=None,
                       help="training length for the YaRN temperature (default: chunk size)")
    group.add_argument("--no-dca", action="store_true", help="plain RoPE even if the checkpoint enables DCA")


def _dca_from_cli(args: argparse.Namespace) -> DCAConfig | str | None:
    """The ``dca`` option of the DCA flags: off, "auto" (the checkpoint's), or a DCAConfig."""
    if args.no_dca:
        return None
    if args.dca_chunk_size is None:
        if args.dca_local_size is not None or args.dca_original_max_position_embeddings is not None:
            raise ConfigError("--dca-local-size and --dca-original-max-position-embeddings need --dca-chunk-size.")
        return "auto"
    chunk = args.dca_chunk_size
    local = args.dca_local_size if args.dca_local_size is not None else max(1, chunk // 32)
    orig = args.dca_original_max_position_embeddings
    return DCAConfig(chunk_size=chunk, local_size=local,
                     original_max_position_embeddings=chunk if orig is None else orig)


_HINTS = typing.get_type_hints(EngineConfig)
