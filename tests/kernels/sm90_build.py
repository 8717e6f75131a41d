"""Build a Triton kernel for Hopper (sm_90) without a GPU: ``python sm90_build.py`` (no TRITON_INTERPRET).

Triton compiles ahead of time for a named target: Python -> TTIR -> TTGIR -> LLVM -> PTX -> cubin
(ptxas ships with Triton), with no driver. So the CPU can prove that a kernel builds for the H100/H200,
which tensor-core instructions it uses and how much shared memory it needs; only its speed needs the
GPU. ``test_sm90_build.py`` runs the cases below in a subprocess (this module must import the kernels
with the interpreter off) and checks what this prints, one JSON line per case.

Integer arguments equal to 1 are specialised by Triton at launch (a contiguous last dimension); a case
names them as constants so the build is the one a launch with those strides gets.
"""

from __future__ import annotations

import json
import re
import sys


def build(fn, pointers: dict[str, str], constants: dict, *, num_warps: int, num_stages: int,
          floats: tuple[str, ...] = ("qk_scale",)) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    # what a launch at 7B shapes specialises on: 16-byte aligned pointers (torch allocations and the
    # cache's rows) and the tensor strides that are multiples of 16 (heads x head_dim, head_dim, ...);
    # without it Triton cannot vectorise the loads or pipeline them with cp.async
    divisible = [name for name in fn.arg_names if name not in constants
                 and (name in pointers or re.fullmatch(r"stride_(q[smh]|k[nh]|v[nhd]|o[smh])", name))]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    return {"triton": triton.__version__, "shared": kernel.metadata.shared,
            "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx))),
            "wgmma_count": len(re.findall(r"wgmma\.mma_async", ptx)),
            "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
            "async_copies": len(re.findall(r"async_copy_global_to_local", kernel.asm["ttgir"]))}


def _fp8_pointers(names, out_name="out_ptr") -> dict[str, str]:
    types = {name: "*fp32" for name in names if name.endswith("_ptr")}  # lse, scales
    types.update({"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", out_name: "*bf16"})
    for name in ("prob_ptr", "block_count_ptr", "block_offset_ptr", "column_count_ptr", "column_index_ptr"):
        if name in types:
            types[name] = "*i32"
    return types


def cases() -> dict[str, dict]:
    """The FP8 kernels (and the bf16 dense and sparse kernels) at 7B shapes (28 query heads, 4 kv
    heads, head_dim 128) as the engine launches them on CUDA: V token-minor (a 16-bit cache quantised)
    and head_dim-minor (an FP8 cache read as stored)."""
    from qwen1m.kernels import flash_attn as fa
    from qwen1m.kernels import flash_attn_problems as fp
    from qwen1m.kernels import sparse_attn as sa
    from qwen1m.kernels.flash_attn_fp8 import _fp8_config

    cuda = type("Device", (), {"type": "cuda"})()
    cfg = _fp8_config(128, cuda)
    dense = {"GROUP": 7, "HEAD_DIM": 128, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
             "DOT_PRECISION": "tf32", "UPCAST_DOT": False, "FP8": True, "stride_qd": 1, "stride_kd": 1,
             "stride_od": 1}
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    out = {}
    for layout, stride in (("v_token_minor", {"stride_vn": 1}), ("v_dim_minor", {"stride_vd": 1})):
        fn = fa._flash_attn_fwd_kernel
        out[f"flash_attn_fp8/{layout}"] = build(fn, _fp8_pointers(fn.arg_names),
                                                {**dense, "CAUSAL": True, **stride}, **launch)
        fn = fp._flash_attn_problems_kernel
        out[f"flash_attn_problems_fp8/{layout}"] = build(
            fn, _fp8_pointers(fn.arg_names), {**dense, "CAUSAL": False, "PROB_FIELDS": 8, **stride}, **launch)
        fn = sa._sparse_attn_fwd_kernel
        sparse_launch = sa._launch_config(128, __import__("torch").float8_e4m3fn, cuda)
        out[f"sparse_attn_fp8/{layout}"] = build(
            fn, _fp8_pointers(fn.arg_names),
            {"GROUP": 7, "HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_N": 64, "DOT_PRECISION": "tf32", "UPCAST_DOT": False,
             "HEADS_FIRST": False, "SPLIT": True, "FP8": True, "stride_qd": 1, "stride_kd": 1, "stride_od": 1,
             **stride}, **sparse_launch)
    # the bf16 kernels every prefill uses today, as a reference for the FP8 builds above
    torch = __import__("torch")
    bf16 = {name: ("*bf16" if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr") else t)
            for name, t in _fp8_pointers(fa._flash_attn_fwd_kernel.arg_names).items()}
    cfg16 = fa._default_config(128, torch.bfloat16, cuda)
    out["flash_attn_bf16/v_dim_minor"] = build(
        fa._flash_attn_fwd_kernel, bf16,
        {**dense, "FP8": False, "BLOCK_M": cfg16["BLOCK_M"], "BLOCK_N": cfg16["BLOCK_N"], "CAUSAL": True,
         "stride_vd": 1}, num_warps=cfg16["num_warps"], num_stages=cfg16["num_stages"])
    fn = sa._sparse_attn_fwd_kernel
    bf16 = {name: ("*bf16" if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr") else t)
            for name, t in _fp8_pointers(fn.arg_names).items()}
    out["sparse_attn_bf16/v_dim_minor"] = build(
        fn, bf16, {"GROUP": 7, "HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_N": 64, "DOT_PRECISION": "tf32",
                   "UPCAST_DOT": False, "HEADS_FIRST": False, "SPLIT": True, "FP8": False, "stride_qd": 1,
                   "stride_kd": 1, "stride_od": 1, "stride_vd": 1}, **sa._launch_config(128, torch.bfloat16, cuda))
    return out


if __name__ == "__main__":
    wanted = sys.argv[1:]
    for name, result in cases().items() if not wanted else ((n, r) for n, r in cases().items() if n in wanted):
        print(json.dumps({"case": name, **result}), flush=True)
