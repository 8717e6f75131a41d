"""Which kernels one attention backend uses, and the only reason it stops using one.

A Triton kernel is switched off, for the backend that owns this choice and nowhere else, when it
cannot be *built*: Triton is missing (ImportError), Triton cannot compile it (CompilationError), or
the GPU cannot run the compiled configuration (OutOfResources: too much shared memory; PTXASError).
The PyTorch path that replaces it computes the same result, 43-49x slower in the sparse prefill, so
any other error is a bug that must surface and propagates. ``torch.OutOfMemoryError`` is not a
kernel failure either: it propagates to the caller, which decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


def _build_errors() -> tuple[type[Exception], ...]:
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except ImportError:  # no Triton: importing a kernel module raises ImportError, nothing else
        return (ImportError,)
    return (ImportError, CompilationError, OutOfResources, PTXASError)


# The exceptions that mean "this kernel cannot be built here" (see the module docstring).
KERNEL_BUILD_ERRORS = _build_errors()


@dataclass(slots=True)
class KernelChoice:
    """The kernels of one backend. The sparse flags start on and are turned off by ``fall_back``."""

    # the paged decode kernel: None uses it on CUDA only; True / False force it (tests run it interpreted)
    decode_kernel: bool | None = None
    # with the decode kernel: True is the fused path (three launches per layer), False the per-region
    # path (PyTorch RoPE, one kernel call per region, LSE merge) that tests compare it with
    fused_decode: bool = True
    sparse_index: bool = True  # the Triton vertical-slash index builder, on CUDA
    sparse_sums: bool = True  # the Triton attention-sum kernels of the sparse estimate, on CUDA
    sparse_batched: bool = True  # the batched sparse prefill (every piece and region at once), on CUDA
    prefill_fp8: bool = False  # attention_dtype="fp8": prefill attention in e4m3 (attention/fp8.py)
    sparse_fp8: bool = True  # with prefill_fp8: the batched sparse path's FP8 kernels, on CUDA
    oom_warned: bool = False  # the batched sparse prefill ran out of memory once (warned; later: debug)

    def fall_back(self, kernel: str, error: Exception, instead: str) -> None:
        """``kernel`` (a flag above) cannot be built: turn it off for this backend and say so once."""
        setattr(self, kernel, False)
        log.warning("the %s kernel cannot be built here (%s: %s); this model uses %s instead", kernel,
                    type(error).__name__, error, instead)
