"""The public, vLLM-shaped entry point: ``LLM(model).generate(prompts, SamplingParams)``."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qwen1m.attention.sparse_prefill import SparseTelemetry
from qwen1m.cache.planner import MemoryPlan
from qwen1m.engine.builder import BuildSpec, build_rank, build_spec
from qwen1m.engine.llm_engine import LLMEngine
from qwen1m.engine_config import ENGINE_FIELDS, EngineConfig
from qwen1m.errors import ConfigError, Qwen1mError, RequestError
from qwen1m.generation_config import load_generation_defaults
from qwen1m.hub import resolve_model
from qwen1m.model.shard import TPShard
from qwen1m.model.wiring import ModelWiring
from qwen1m.outputs import PrefillProgress, RequestOutput
from qwen1m.prompts import as_params_list, as_prompt_list, encode_prompts
from qwen1m.sampling_params import SamplingParams
from qwen1m.shared_engine import SharedEngine

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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was requested but no CUDA GPU is available.")
    return dev


class LLM:
    """Load a Qwen2/Qwen3 checkpoint folder and generate.

    ``LLM(model, **options)``: the keywords are exactly the fields of ``EngineConfig``
    (``qwen1m.engine_config``, where each is documented with its default), validated there once; an
    unknown keyword is a TypeError, as for any Python function. ``model`` may be given by position.
    ``LLM(**config.options())`` builds one from an ``EngineConfig`` (the CLI does).

    recall_probe: ``qwen1m calibrate``'s ``attention.calibrate.RecallProbe``, handed to the attention
    backend when it is built: every long prefill runs dense and the probe measures the recall of its
    sparse budgets (``probe.base`` becomes the sparse config; one process, no tensor parallelism).
    """

    def __init__(self, model: str | Path | None = None, *, recall_probe=None, **options: Any):
        unknown = sorted(options.keys() - ENGINE_FIELDS)
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}; its options are the "
                            "fields of qwen1m.engine_config.EngineConfig.")
        if recall_probe is not None and options.get("tensor_parallel_size", 1) != 1:
            raise ConfigError("calibration (recall_probe) runs in one process: tensor_parallel_size must be 1.")
        self.engine_config = config = EngineConfig(model=model, **options)
        folder = bundled_model_path() if config.model is None else resolve_model(config.model)
        self.device = _resolve_device(config.device)
        spec = build_spec(config, folder, self.device)
        if recall_probe is not None:  # the probe's budgets, as they are (no threshold from the checkpoint)
            spec = replace(spec, sparse=recall_probe.base)
        torch.manual_seed(config.seed)
        self.dtype = spec.dtype
        self.config = spec.config  # the model's config, DCA resolved
        self.model_path = folder
        self.generation_defaults = load_generation_defaults(folder)  # the folder's generation_config.json
        self.sparse_config = spec.sparse
        self.tokenizer = self._load_tokenizer(folder, config.load_format)
        self._tp = None
        telemetry = SparseTelemetry() if config.sparse_telemetry and self.sparse_config is not None else None
        wiring = ModelWiring(telemetry=telemetry, probe=recall_probe)
        if config.tensor_parallel_size == 1:
            parts = build_rank(spec, TPShard(0, 1), self.device, wiring=wiring)
        else:
            parts = self._start_tensor_parallel(spec, wiring)
        self.model = parts.model
        self.memory_plan: MemoryPlan = parts.plan
        logger.info("%s", self.memory_plan)
        # decode replays CUDA graphs on one GPU unless asked not to (telemetry and TP steps run eagerly)
        graphs = (self.device.type == "cuda" and not config.enforce_eager and config.tensor_parallel_size == 1
                  and not config.sparse_telemetry)
        tiers = self._kv_tiers(spec, parts.kv_cache, config, broadcaster=parts.model.before_forward)
        self.engine = LLMEngine(self.model, self.tokenizer, kv_cache=parts.kv_cache, max_model_len=parts.max_model_len,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                max_num_seqs=config.max_num_seqs, cuda_graphs=graphs,
                                prefix_caching=config.enable_prefix_caching, kv_tiers=tiers)
        self._shared = SharedEngine(self.engine)  # generate, chat and logits are safe from any thread

    @staticmethod
    def _kv_tiers(spec: BuildSpec, kv_cache, config: EngineConfig, broadcaster):
        """The host-memory and disk tiers under the prefix cache, or None. Under tensor parallelism
        (``broadcaster``: the driver's step broadcaster) every worker gets a replica of them."""
        if not config.cpu_offload_gb and config.prefix_cache_dir is None:
            return None
        from qwen1m.cache.cache_identity import cache_settings
        from qwen1m.cache.kv_tiers import build_tiers
        from qwen1m.engine.kv_allocator import scale_tolerance

        settings = None
        if config.prefix_cache_dir is not None:
            settings = cache_settings(folder=spec.folder, load_format=spec.load_format, dtype=spec.dtype, fp8=spec.fp8,
                                      block_size=spec.block_size, dca=spec.config.dca, sparse=spec.sparse,
                                      tp_size=spec.tensor_parallel_size, tp_rank=0, attention_fp8=spec.attention_fp8)
        tolerance = scale_tolerance(kv_cache)
        options = dict(cpu_offload_gb=config.cpu_offload_gb, prefix_cache_dir=config.prefix_cache_dir,
                       prefix_cache_max_gb=config.prefix_cache_max_gb, settings=settings)
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
