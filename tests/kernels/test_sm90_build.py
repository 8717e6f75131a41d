"""The attention kernels build for Hopper (sm_90); the FP8 ones put both products on FP8 tensor cores.

Checked on the CPU by compiling ahead of time (``sm90_build.py``: Triton's own ptxas, no driver), at
7B shapes with the launch configurations the engine uses on CUDA, for both V layouts: token-minor
(a 16-bit cache, quantised) and head_dim-minor (an FP8 cache read as stored). What it proves:
- the kernels compile to a cubin for sm_90 (no CompilationError / PTXASError at a first GPU launch);
- every warpgroup MMA is ``wgmma ... e4m3.e4m3`` (Q.K and P.V both in FP8: nothing falls back to
  bf16 or tf32 MMAs, and no pre-Hopper ``mma.sync``);
- shared memory fits one H100/H200 block (227 KiB);
- the K / V tiles are loaded with cp.async (Triton's software pipelining), given the alignment a launch
  at 7B shapes specialises on (``sm90_build.build``): without it every tile load would stall the MMAs.
Speed is not checked here: that is ``benchmarks/bench_attention_fp8.py`` on the GPU.
Measured with triton 3.6.0 (the GPU machine's) and 3.9.0 (this one's): the same instructions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent
MAX_SHARED = 227 * 1024  # sm_90: the largest dynamic shared memory of one block
CASES = [f"{kernel}/{layout}" for layout in ("v_token_minor", "v_dim_minor")
         for kernel in ("flash_attn_fp8", "flash_attn_problems_fp8", "sparse_attn_fp8")]


@pytest.fixture(scope="module")
def builds() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(HERE / "sm90_build.py")], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {row["case"]: row for row in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("case", ["flash_attn_bf16/v_dim_minor", "sparse_attn_bf16/v_dim_minor"])
def test_bf16_kernels_build_for_sm90_on_bf16_tensor_cores(builds, case):
    """The 16-bit kernels the FP8 ones share their bodies with still build, on bf16 wgmma, pipelined."""
    row = builds[case]
    assert row["wgmma"] and all(shape.endswith(".bf16.bf16") for shape in row["wgmma"]), row["wgmma"]
    assert row["mma_sync"] == 0 and 0 < row["shared"] <= MAX_SHARED and row["async_copies"] > 0


@pytest.mark.parametrize("case", CASES)
def test_fp8_kernel_builds_for_sm90_on_fp8_tensor_cores(builds, case):
    row = builds[case]
    assert row["wgmma"], f"{case}: no warpgroup MMA at all"
    assert all(shape.endswith(".e4m3.e4m3") for shape in row["wgmma"]), f"{case}: {row['wgmma']}"
    assert row["mma_sync"] == 0
    assert 0 < row["shared"] <= MAX_SHARED
    assert row["async_copies"] > 0, f"{case}: no pipelined (cp.async) loads"
