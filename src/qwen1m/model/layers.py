"""Building blocks of the Qwen2 decoder: RMSNorm and the SwiGLU MLP (HF module names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like transformers' Qwen2RMSNorm.

    ``forward(x, residual)`` first adds the residual stream and returns (normed, x + residual): the
    engine's layers pass the stream along this way so that on a GPU the add and the norm are one
    Triton launch (``qwen1m.kernels.rmsnorm``) instead of ~9 kernels. The kernel has no backward, so
    it runs only where no gradient is wanted (the engine; training keeps the PyTorch maths).
    """

    # None: the kernel on CUDA tensors without autograd; True / False force it (tests run it interpreted)
    use_kernel: bool | None = None

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        kernel = x.is_cuda if self.use_kernel is None else self.use_kernel
        if kernel and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            from qwen1m.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self(x), x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)). Called on one prefill chunk at a time, so the
    [num_tokens, intermediate] activations stay bounded by the engine's token budget."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse_projections(self) -> None:
        """One [2 * intermediate, hidden] matrix for gate and up (one GEMM / GEMV instead of two);
        gate_proj / up_proj keep their names as views of it, so state_dict is unchanged."""
        self.gate_up_weight = fuse_linears([self.gate_proj, self.up_proj])[0]


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears over the same input into one tensor and make
    each module's parameters views of it; returns (weight, bias or None). Frozen (inference only)."""
    fused = []
    for name in ("weight", "bias"):
        parts = [getattr(lin, name) for lin in linears]
        if any(p is None for p in parts):
            fused.append(None)
            continue
        whole = torch.cat([p.detach() for p in parts])
        for lin, view in zip(linears, whole.split([p.shape[0] for p in parts])):
            setattr(lin, name, nn.Parameter(view, requires_grad=False))
        fused.append(whole)
    return fused[0], fused[1]
