"""Where a decode step's time goes: torch profiler over 5 steps of a 7B-1M-shaped model (32K context
by default; with --context N the prompt's KV slots are reserved without a prefill, as bench_engine's
--skip-prefill does, so a 1M-context step is profiled without minutes of prefill).

    PYTHONPATH=src python3 benchmarks/profile_decode.py [--enforce-eager] [--context 1000000]

Prints the top operators by CPU time (launch overhead shows as cudaLaunchKernel) and by GPU time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from qwen1m import LLM, SamplingParams

CONFIG = Path(__file__).parent / "configs" / "qwen2.5-7b-instruct-1m"


def main() -> None:
    context = int(sys.argv[sys.argv.index("--context") + 1]) if "--context" in sys.argv else None
    llm = LLM(CONFIG, load_format="dummy", dtype="bfloat16", max_model_len=(context or 32768) + 1024,
              enforce_eager="--enforce-eager" in sys.argv)
    ids = torch.randint(0, 1000, (context or 32768,)).tolist()
    rid = llm.engine.add_request(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    if context:  # reserve the KV slots, skip the prefill (a decode step reads the same bytes)
        for seq in llm.engine.requests[rid]:
            seq.num_computed_tokens = seq.num_prompt_tokens
            seq.token_ids.append(0)
    for _ in range(3):  # prefill, then warm decode steps (graph capture happens here)
        llm.engine.step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            llm.engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
