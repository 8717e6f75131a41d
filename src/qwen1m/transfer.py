"""Small host-built tensors onto the device without a host sync (a leaf module: engine, attention and
kernels all use it)."""

from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-built tensor on ``device`` without a host sync: a pageable copy would block the
    host (and counts as a sync in ``torch.cuda.set_sync_debug_mode``); a pinned one is asynchronous."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
