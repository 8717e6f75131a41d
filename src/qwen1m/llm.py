"""The public, vLLM-shaped entry point: ``LLM(model).generate(prompts, SamplingParams)``."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from qwen1m.attention.sparse_prefill import SparseTelemetry
from qwen1m.cache.planner import MemoryPlan
from qwen1m.config import DCAConfig, load_model_config
from qwen1m.engine.builder import BuildSpec, build_rank
from qwen1m.engine.llm_engine import LLMEngine
from qwen1m.errors import ConfigError, Qwen1mError, RequestError
from qwen1m.generation_config import load_generation_defaults
from qwen1m.hub import resolve_model
from qwen1m.model.loader import resolve_dtype
from qwen1m.model.shard import TPShard, check_divisible
from qwen1m.model.wiring import ModelWiring
from qwen1m.options import block_size_option, sparse_option
from qwen1m.outputs import PrefillProgress, RequestOutput
from qwen1m.prompts import as_params_list, as_prompt_list, encode_prompts
from qwen1m.sampling_params import SamplingParams
from qwen1m.shared_engine import SharedEngine
from qwen1m.sparse_config import SparseConfig

logger = logging.getLogger(__name__)

_BUNDLED = Path(__file__).resolve().parent / "bundled"


def bundled_model_path() -> Path:
    """The folder of the small model that ships inside the package."""
    if not (_BUNDLED / "config.json").is_file():
        raise Qwen1mError(
            f"The bundled model is not present in this installation ({_BUNDLED} has no config.json); "
            "pass model=<checkpoint folder> instead."
        )
    return _BUNDLED


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was requested but no CUDA GPU is available.")
    return dev


class LLM:
    """Load a Qwen2/Qwen3 checkpoint folder and generate.

    model: a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json, ...), or a
        Hub ID such as "Qwen/Qwen2.5-7B-Instruct-1M" (from the hub cache, else downloaded if
        HF_HUB_OFFLINE is not set: configs, tokenizer and safetensors only; ``qwen1m.hub``);
        None loads the bundled model. Its generation_config.json gives the default sampling.
    dtype: "auto" (checkpoint dtype on GPU, float32 on CPU), "float32", "bfloat16", "float16".
    load_format: "auto"/"safetensors", or "dummy" for random weights (benchmarks; config.json only).
    dca: "auto" uses the checkpoint's ``dual_chunk_attention_config``; a ``DCAConfig`` turns DCA on
        for any model (e.g. a 32K-trained Qwen2.5 stretched to 128K+); None or False turns it off.
    max_model_len: longest prompt + output; defaults to ``max_position_embeddings`` (lowered to what
        fits in memory when not given explicitly; an explicit value that does not fit is refused).
    max_num_batched_tokens: tokens per engine step (the prefill chunk; the report uses 32768).
    kv_cache_dtype: "auto" (the model dtype) or "fp8" (e4m3 with per-token, per-head scales).
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

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        load_format: str = "auto",
        dca: DCAConfig | str | bool | None = "auto",
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 32768,
        max_num_seqs: int = 64,
        kv_cache_dtype: str = "auto",
        block_size: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory: int | None = None,
        sparse_attention_config: str | Path | SparseConfig | bool | None = "auto",
        sparse_threshold: int | None = None,
        sparse_dense_above: float | None = None,
        sparse_telemetry: bool = False,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = False,
        seed: int = 0,
        cpu_offload_gb: float | None = None,
        prefix_cache_dir: str | Path | None = None,
        prefix_cache_max_gb: float | None = None,
    ):
        folder = bundled_model_path() if model is None else resolve_model(model)
        cfg = load_model_config(folder)
        if dca == "auto":
            dca_cfg = cfg.dca
        elif dca is None or dca is False:
            dca_cfg = None
        elif isinstance(dca, DCAConfig):
            dca_cfg = dca
        else:
            raise ConfigError(f"LLM(dca=...) must be 'auto', None/False or a DCAConfig, got {dca!r}.")
        explicit_len = max_model_len is not None
        if max_model_len is None:
            max_model_len = cfg.max_position_embeddings
        if max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {max_model_len}.")
        if dca_cfg is not None and max_model_len > cfg.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={max_model_len} exceeds max_position_embeddings={cfg.max_position_embeddings} "
                f"in {folder / 'config.json'}; DCA is only defined up to that length."
            )
        if max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {max_num_batched_tokens}.")
        self.device = _resolve_device(device)
        self.dtype = resolve_dtype(dtype, cfg, self.device)
        torch.manual_seed(seed)
        self.config = replace(cfg, dca=dca_cfg)
        self.model_path = folder
        self.generation_defaults = load_generation_defaults(folder)  # the folder's generation_config.json
        self.sparse_config = sparse_option(sparse_attention_config, folder, cfg, dca_cfg, sparse_threshold,
                                           sparse_dense_above)
        self.tokenizer = self._load_tokenizer(folder, load_format)
        if kv_cache_dtype not in ("auto", "fp8"):
            raise ConfigError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}.")
        if tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}.")
        check_divisible(cfg, tensor_parallel_size)
        spec = BuildSpec(folder, self.config, self.sparse_config, self.dtype,
                         "dummy" if load_format == "dummy" else "safetensors", kv_cache_dtype == "fp8",
                         block_size_option(block_size, dca_cfg), max_model_len, explicit_len, max_num_batched_tokens,
                         max_num_seqs, gpu_memory_utilization, kv_cache_memory, tensor_parallel_size)
        self._tp = None
        telemetry = SparseTelemetry() if sparse_telemetry and self.sparse_config is not None else None
        wiring = ModelWiring(telemetry=telemetry)
        if tensor_parallel_size == 1:
            parts = build_rank(spec, TPShard(0, 1), self.device, wiring=wiring)
        else:
            parts = self._start_tensor_parallel(spec, wiring)
        self.model = parts.model
        self.memory_plan: MemoryPlan = parts.plan
        logger.info("%s", self.memory_plan)
        # decode replays CUDA graphs on one GPU unless asked not to (telemetry and TP steps run eagerly)
        graphs = (self.device.type == "cuda" and not enforce_eager and tensor_parallel_size == 1
                  and not sparse_telemetry)
        tiers = self._kv_tiers(spec, parts.kv_cache, cpu_offload_gb, prefix_cache_dir, prefix_cache_max_gb,
                               broadcaster=parts.model.before_forward)
        self.engine = LLMEngine(self.model, self.tokenizer, kv_cache=parts.kv_cache, max_model_len=parts.max_model_len,
                                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                cuda_graphs=graphs, prefix_caching=enable_prefix_caching, kv_tiers=tiers)
        self._shared = SharedEngine(self.engine)  # generate, chat and logits are safe from any thread

    @staticmethod
    def _kv_tiers(spec: BuildSpec, kv_cache, cpu_offload_gb, prefix_cache_dir, prefix_cache_max_gb, broadcaster):
        """The host-memory and disk tiers under the prefix cache, or None. Under tensor parallelism
        (``broadcaster``: the driver's step broadcaster) every worker gets a replica of them."""
        if not cpu_offload_gb and prefix_cache_dir is None:
            if prefix_cache_max_gb is not None:
                raise ConfigError("prefix_cache_max_gb needs prefix_cache_dir.")
            return None
        if cpu_offload_gb is not None and cpu_offload_gb < 0:
            raise ConfigError(f"cpu_offload_gb must be >= 0, got {cpu_offload_gb}.")
        if prefix_cache_max_gb is not None and prefix_cache_max_gb <= 0:
            raise ConfigError(f"prefix_cache_max_gb must be positive, got {prefix_cache_max_gb}.")
        from qwen1m.cache.cache_identity import cache_settings
        from qwen1m.cache.kv_tiers import build_tiers
        from qwen1m.engine.kv_allocator import scale_tolerance

        settings = None
        if prefix_cache_dir is not None:
            settings = cache_settings(folder=spec.folder, load_format=spec.load_format, dtype=spec.dtype, fp8=spec.fp8,
                                      block_size=spec.block_size, dca=spec.config.dca, sparse=spec.sparse,
                                      tp_size=spec.tensor_parallel_size, tp_rank=0)
        tolerance = scale_tolerance(kv_cache)
        options = dict(cpu_offload_gb=cpu_offload_gb, prefix_cache_dir=prefix_cache_dir,
                       prefix_cache_max_gb=prefix_cache_max_gb, settings=settings)
        tiers = build_tiers(kv_cache, tolerance, **options)
        if spec.tensor_parallel_size > 1:
            from qwen1m.parallel.tier_sync import share_tiers

            share_tiers(tiers, broadcaster, dict(options, scale_tolerance=tolerance))
        return tiers

    def _start_tensor_parallel(self, spec: BuildSpec, wiring: ModelWiring):
        """Spawn ranks 1..N-1 (or join the ranks torchrun started) and build rank 0's part (with ``wiring``)."""
        import os

        from qwen1m.parallel import runtime
        from qwen1m.parallel.placement import torchrun_rank

        if os.environ.get("WORLD_SIZE") and os.environ.get("RANK") is not None:  # started by torchrun
            size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            if size != spec.tensor_parallel_size:
                raise ConfigError(f"torchrun started {size} processes but tensor_parallel_size is "
                                  f"{spec.tensor_parallel_size}; they must be equal.")
            device, backend, share = torchrun_rank(self.device, rank, size)
            runtime.init_group(rank, size, "env://", device, backend)
            broadcaster = runtime.StepBroadcaster([]) if rank == 0 else None
            parts = build_rank(spec, TPShard(rank, size), device, share=share,
                               wiring=runtime.rank_wiring(wiring if rank == 0 else None, broadcaster))
            if rank != 0:  # a worker: serve the driver's steps, then leave the program
                runtime.worker_loop(parts.model, parts.kv_cache, device)
                runtime.leave_group()
                runtime.exit_worker()
            self._tp = broadcaster
            return parts
        self._tp = runtime.TPDriver(spec, self.device, wiring)
        # stop the workers when this LLM is garbage collected or the interpreter exits
        self._finalizer = weakref.finalize(self, self._tp.close)  # runs close at most once
        return self._tp.parts

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (also done at interpreter exit); a no-op on one device.

        Waits for a step another thread is running: the workers must not leave in the middle of it."""
        if self._tp is None:
            return
        with self._shared.locked():
            if self._tp is None:  # another thread shut down while this one waited
                return
            if getattr(self, "_finalizer", None) is not None:
                self._finalizer()
            else:  # under torchrun: tell the other ranks to leave their loop, then leave the group
                self._tp.stop()
                from qwen1m.parallel.runtime import leave_group

                leave_group()
            self._tp = None

    @staticmethod
    def _load_tokenizer(folder: Path, load_format: str):
        from qwen1m.tokenizer import Tokenizer

        has_other = any((folder / f).is_file() for f in ("vocab.json", "merges.txt", "tokenizer.model"))
        if not (folder / "tokenizer.json").is_file() and not has_other:
            # weights-only folders (tests, benchmark configs): prompts must then be token ids
            logger.info("%s has no tokenizer.json: prompts must be token ids", folder)
            return None
        return Tokenizer.from_folder(folder)

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        stream: bool = False,
        progress: Callable[[PrefillProgress], None] | None = None,
    ) -> list[RequestOutput] | Iterator[RequestOutput]:
        """Generate for every prompt (strings or token id lists).

        Returns the finished outputs in prompt order ([] for no prompts); with ``stream=True`` an iterator of
        RequestOutputs instead, one after every step that changed a request (``new_text`` holds the
        delta). ``progress`` is called after each step with the state of this call's prefilling
        requests. Every prompt is checked before any is queued (a ``RequestError`` names the first bad
        one by its index). Threads may call this at once: their requests share the engine's steps. A
        stream that is closed, or dropped before its end, aborts its unfinished requests.
        """
        prompts = as_prompt_list(prompts)
        if not prompts:  # as vLLM: nothing asked, nothing generated
            return iter([]) if stream else []
        params = as_params_list(self.get_default_sampling_params() if sampling_params is None else sampling_params,
                                len(prompts))
        encoded = encode_prompts(prompts, self.tokenizer,
                                 lambda ids, label: self.engine.check_prompt(ids, label=label))
        outputs = self._shared.submit(encoded, params, progress)
        if stream:
            return outputs
        ids = outputs.request_ids
        try:
            finished = {out.request_id: out for out in outputs if out.finished}
        finally:
            outputs.close()  # an interrupt (Ctrl-C) mid-way leaves nothing queued
        return [finished[rid] for rid in ids]

    def generate_stream(
        self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
        progress: Callable[[PrefillProgress], None] | None = None,
    ) -> Iterator[RequestOutput]:
        """One prompt, streamed: ``generate([prompt], params, stream=True)``."""
        return self.generate([prompt], sampling_params, stream=True, progress=progress)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation (or a list of them) and generate."""
        if self.tokenizer is None:
            raise RequestError("This model has no tokenizer, so chat() cannot apply a chat template.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tools=tools)
                   for c in conversations]
        return self.generate(prompts, sampling_params)

    def get_tokenizer(self):
        """The model's tokenizer (vLLM's name); a ConfigError when the folder has none."""
        if self.tokenizer is None:
            raise ConfigError(f"{self.model_path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt), "
                              "so prompts must be token ids.")
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling the model's ``generation_config.json`` asks for (vLLM's defaults where it is
        silent): what ``generate`` and ``chat`` use when given no SamplingParams."""
        return SamplingParams(**self.generation_defaults)

    def sparse_report(self) -> dict:
        """Per layer: the density of sparse prefill so far and the recall of the sampled heads."""
        telemetry = self.model.backend.telemetry
        if telemetry is None:
            raise ConfigError("sparse_report() needs LLM(..., sparse_telemetry=True) and a sparse config.")
        with self._shared.locked():  # not while another thread's step adds to it
            return telemetry.summary()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab_size] of every position (same path as generation)."""
        with self._shared.locked() as engine:
            return engine.prompt_logits(list(token_ids))
