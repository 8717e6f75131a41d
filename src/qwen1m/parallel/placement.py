"""Where each tensor-parallel rank runs, and which collective backend joins the ranks.

    CPU:                 every rank on the CPU, gloo
    CUDA (default):      rank r on cuda:r, NCCL (one GPU per rank, as on a real multi-GPU machine)
    QWEN1M_TP_DEVICES:   a comma-separated CUDA index per rank, e.g. "0,0" puts both ranks of
                         tensor_parallel_size=2 on cuda:0; when ranks share a GPU the backend is gloo
                         (NCCL refuses two ranks on one device), each rank plans its KV cache for its
                         share of that GPU (``share``), and the sharded CUDA path runs on a one-GPU box

Every rank computes the same placement from the same environment, so they agree on the backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qwen1m.errors import ConfigError

DEVICES_ENV = "QWEN1M_TP_DEVICES"


@dataclass(frozen=True, slots=True)
class Placement:
    devices: tuple[str, ...]  # per rank: "cpu" or "cuda:N" (strings: the placement travels to workers)
    backend: str  # "nccl" or "gloo"

    def device(self, rank: int) -> torch.device:
        return torch.device(self.devices[rank])

    def share(self, rank: int) -> int:
        """How many ranks (this one included) plan memory on this rank's device."""
        return self.devices.count(self.devices[rank])


def place_ranks(device: torch.device, size: int) -> Placement:
    """The placement of ``size`` ranks for an engine asked to run on ``device``."""
    if device.type != "cuda":
        return Placement((str(device),) * size, "gloo")
    count = torch.cuda.device_count()
    spec = os.environ.get(DEVICES_ENV, "").strip()
    if spec:
        try:
            indices = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ConfigError(f"{DEVICES_ENV}={spec!r} must be comma-separated CUDA device indices, "
                              "one per tensor-parallel rank (e.g. '0,0').") from None
        if len(indices) != size:
            raise ConfigError(f"{DEVICES_ENV}={spec!r} names {len(indices)} devices but tensor_parallel_size "
                              f"is {size}; give one CUDA index per rank.")
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            raise ConfigError(f"{DEVICES_ENV}={spec!r} names cuda:{bad[0]}, but this machine has {count} "
                              f"visible GPU(s) (indices 0..{count - 1}).")
    else:
        if count < size:
            raise ConfigError(
                f"tensor_parallel_size={size} needs {size} GPUs but this machine has {count} visible; to test "
                f"the sharded path on fewer GPUs, set {DEVICES_ENV} to one CUDA index per rank (e.g. "
                f"{DEVICES_ENV}={','.join(['0'] * size)})."
            )
        indices = list(range(size))
    backend = "nccl" if len(set(indices)) == len(indices) else "gloo"
    return Placement(tuple(f"cuda:{i}" for i in indices), backend)


def torchrun_rank(device: torch.device, rank: int, size: int) -> tuple[torch.device, str, int]:
    """(device, backend, share) of this process when ``torchrun`` started the ranks: LOCAL_RANK picks
    the GPU (ranks may span machines), unless QWEN1M_TP_DEVICES places the ranks of one machine."""
    if device.type != "cuda" or os.environ.get(DEVICES_ENV, "").strip():
        placement = place_ranks(device, size)
        return placement.device(rank), placement.backend, placement.share(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl", 1
