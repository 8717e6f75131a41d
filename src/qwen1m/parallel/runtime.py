"""Tensor-parallel runtime: one process per rank, the driver (rank 0) keeps the scheduler.

    driver (rank 0): LLMEngine -> model.forward ──before_forward──> broadcast(step) ──> ranks 1..N-1
    every rank:      embed -> layers (local heads / MLP slice, all-reduce after o_proj, down_proj) -> norm
    driver:          lm_head on the rows that sample (its hidden states are complete after the reduce)

A step is sent as plain data (token ids, positions, each sequence's slice and block ids); every rank
holds the same KV blocks (``build_rank`` agrees on their number), for its own KV heads. Workers are
``python -m qwen1m.parallel.worker`` processes that qwen1m starts (``worker.py``), or ranks started by
``torchrun`` (see ``LLM``). Ranks join over gloo on the CPU, NCCL on GPUs, or gloo when ranks share a
GPU (``placement.py``). NVLink multicast stays off (NCCL_NVLS_ENABLE=0): the lent machines forbid it.
With host-memory or disk tiers under the prefix cache, a step also carries the driver's tier ops since
the step before, which every worker replays on its own shard first (``tier_sync.py``).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from qwen1m.attention.metadata import AttentionMetadata, SequenceSlice, decode_inputs
from qwen1m.cache.paged_kv import SequenceBlocks
from qwen1m.errors import Qwen1mError
from qwen1m.model.wiring import ModelWiring
from qwen1m.parallel.tier_sync import TierMsg, TierReplica

logger = logging.getLogger(__name__)

_TIMEOUT = timedelta(minutes=30)  # one collective may wait behind a long prefill step on another rank


@dataclass(slots=True)
class SliceMsg:
    query_start: int
    num_query: int
    num_cached: int
    scale_len: int
    prompt_len: int
    blocks: list[int]


@dataclass(slots=True)
class StepMsg:
    input_ids: list[int]
    positions: list[int]
    slices: list[SliceMsg]
    tier_ops: list = field(default_factory=list)  # tier_sync ops the driver ran since the step before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, init_method: str, device: torch.device, backend: str) -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=_TIMEOUT)


def leave_group() -> None:
    """Every rank meets here before tearing the group down: a rank that closes its connections while a
    peer is still in a collective makes the peer abort (seen with gloo under torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(status: int = 0) -> None:
    """End a worker rank once it has left the group, without the interpreter's teardown: with gloo on
    the CPU, that teardown aborted the process (SIGABRT, "terminate called without an active
    exception") in about 1 run of 10 here, failing a torchrun job after its work was done. The worker
    has nothing left to run (under torchrun, its script's code after ``LLM(...)`` is rank 0's), so it
    flushes its output and leaves with ``status``."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or redirected to a closed pipe: nothing to flush
            pass
    os._exit(status)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def _broadcast(obj: StepMsg | TierMsg | None) -> StepMsg | TierMsg | None:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StepBroadcaster:
    """The driver model's ``before_forward``: checks the workers are alive, then sends the step."""

    def __init__(self, workers: list) -> None:
        self.workers = workers  # worker.WorkerProcess of ranks 1..N-1 (empty under torchrun)
        self.tiers = None  # tier_sync.TierPeers when the prefix cache has host or disk tiers

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                raise Qwen1mError(
                    f"tensor-parallel worker rank {rank} has exited (exit code {proc.exitcode}); "
                    "the engine cannot continue: create a new LLM."
                )

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> None:
        self.check_alive()
        msg = StepMsg(input_ids.tolist(), meta.positions.tolist(),
                      [SliceMsg(s.query_start, s.num_query, s.num_cached, s.scale_len, s.prompt_len,
                                list(s.cache.blocks)) for s in meta.seqs],
                      self.tiers.take() if self.tiers is not None else [])
        _broadcast(msg)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A sum over the ranks; a vanished worker is named, not a bare gloo/NCCL error."""
        try:
            dist.all_reduce(x)
        except RuntimeError as e:  # gloo/NCCL report a vanished peer as a RuntimeError
            self.check_alive()
            raise Qwen1mError(f"a tensor-parallel all-reduce failed: {e}") from None
        return x

    def send(self, msg: TierMsg) -> None:
        """Tier ops between steps."""
        self.check_alive()
        _broadcast(msg)

    def stop(self) -> None:
        if self.tiers is not None and self.tiers.ops:  # e.g. the last request's writes: replayed before leaving
            _broadcast(TierMsg(self.tiers.take()))
        _broadcast(None)


def rank_wiring(base: ModelWiring | None, broadcaster: StepBroadcaster | None = None) -> ModelWiring:
    """``base`` with the collectives of a rank started by torchrun or a worker: the all-reduce, and on
    the driver (``broadcaster``) the step broadcast before each forward."""
    return replace(base if base is not None else ModelWiring(), all_reduce=all_reduce, before_forward=broadcaster)


def worker_loop(model, kv_cache, device: torch.device) -> None:
    """Ranks 1..N-1: replay every step (and tier op) the driver broadcasts until it sends None. The
    model was built with ``rank_wiring`` (its all-reduce)."""
    tiers = TierReplica(kv_cache, device)
    try:
        _serve(model, kv_cache, device, tiers)
    finally:  # this rank's queued disk writes land before it leaves
        tiers.close()


def _serve(model, kv_cache, device: torch.device, tiers: TierReplica) -> None:
    with torch.inference_mode():
        while (msg := _broadcast(None)) is not None:
            tiers.replay(msg.tier_ops)
            if isinstance(msg, TierMsg):
                continue
            slices = [SequenceSlice(s.query_start, s.num_query, s.num_cached, s.scale_len,
                                    SequenceBlocks(kv_cache, s.blocks, device), s.prompt_len) for s in msg.slices]
            meta = AttentionMetadata(torch.tensor(msg.positions, device=device), slices)
            batched = model.backend.decode_batch(slices, device)
            if batched:  # as the driver's ModelRunner.metadata: built once, before the forward
                meta.decode = decode_inputs(batched, device, model.lm_head.weight.dtype, model.dca)
            model(torch.tensor(msg.input_ids, device=device), meta)


class TPDriver:
    """Rank 0's side: start the workers, build rank 0's part with them, broadcast steps, shut down."""

    def __init__(self, spec, device: torch.device, wiring: ModelWiring | None = None) -> None:
        """wiring: what rank 0's model is built with besides the collectives, which are added here."""
        import threading

        from qwen1m.engine.builder import build_rank
        from qwen1m.model.shard import TPShard
        from qwen1m.parallel.placement import place_ranks
        from qwen1m.parallel.worker import WorkerProcess, WorkerSpec

        size = spec.tensor_parallel_size
        placement = place_ranks(device, size)
        self.device = placement.device(0)
        if self.device.type == "cuda":  # this thread's current device too (Triton launches on it)
            torch.cuda.set_device(self.device)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        level = logging.getLogger("qwen1m").getEffectiveLevel()
        self.workers: list = []
        for r in range(1, size):
            self.workers.append(WorkerProcess(WorkerSpec(r, size, init_method, placement, spec, level)))
        # self.broadcaster is set only once every rank is up: close() sends the stop message through it
        broadcaster = StepBroadcaster(self.workers)
        wiring = replace(wiring if wiring is not None else ModelWiring(), all_reduce=broadcaster.all_reduce,
                         before_forward=broadcaster)
        result: dict = {}

        def bootstrap() -> None:  # blocks in rendezvous and collectives: run it where we can watch the workers
            try:
                init_group(0, size, init_method, self.device, placement.backend)
                result["parts"] = build_rank(spec, TPShard(0, size), self.device, share=placement.share(0),
                                             wiring=wiring)
            except BaseException as e:
                result["error"] = e

        thread = threading.Thread(target=bootstrap, daemon=True)
        thread.start()
        ready: set[int] = set()
        while thread.is_alive() or len(ready) < size - 1:
            self._poll(ready)
            thread.join(timeout=0.2)
        if "error" in result:
            self.close()
            raise result["error"]
        self.parts = result["parts"]
        self.broadcaster = broadcaster

    def _poll(self, ready: set[int]) -> None:
        for proc in self.workers:
            if proc.rank in ready:
                continue
            status = proc.status()
            if status is not None and "error" in status:
                self.close()
                raise Qwen1mError(f"tensor-parallel worker rank {proc.rank} failed to start: {status['error']}")
            if status is not None:
                ready.add(proc.rank)
            elif not proc.is_alive():
                self.close()
                raise Qwen1mError(f"tensor-parallel worker rank {proc.rank} exited while starting "
                                  f"(exit code {proc.exitcode}).")

    def close(self) -> None:
        """Stop the workers (they leave their loop on a None step) and tear the group down; idempotent."""
        if getattr(self, "closed", False):
            return
        self.closed = True
        stopped = False
        if getattr(self, "broadcaster", None) is not None and all(p.is_alive() for p in self.workers):
            try:
                self.broadcaster.stop()
                stopped = True
            except RuntimeError:
                pass
        self.broadcaster = None
        if dist.is_initialized():
            if stopped:  # the workers meet us in leave_group on their way out
                try:
                    leave_group()
                except RuntimeError:
                    dist.destroy_process_group()
            else:
                dist.destroy_process_group()
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
            proc.release()
