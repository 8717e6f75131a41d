"""Where a decode step's time goes: torch profiler over 5 steps of a 7B-1M-shaped model (32K context
by default; with --context N the prompt's KV slots are reserved without a prefill, as bench_engine's
--skip-prefill does, so a 1M-context step is profiled without minutes of prefill).

    PYTHONPATH=src python3 benchmarks/profile_decode.py [--enforce-eager] [--context 1000000] [--host]

Prints the step's wall time without the profiler, then the kernels by GPU time per step (their sum
against the wall time shows the idle gaps between kernels), then the top operators by CPU time
(launch overhead shows as cudaLaunchKernel). With --host, also where the host's time goes: the
step's phases timed directly (graph replay call, the wait for the sampled token) and cProfile's
top functions over 30 steps.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from qwen1m import LLM, SamplingParams
from qwen1m.engine import step_tokens

CONFIG = Path(__file__).parent / "configs" / "qwen2.5-7b-instruct-1m"
STEPS = 5


def main() -> None:
    context = int(sys.argv[sys.argv.index("--context") + 1]) if "--context" in sys.argv else None
    llm = LLM(CONFIG, load_format="dummy", dtype="bfloat16", max_model_len=(context or 32768) + 1024,
              enforce_eager="--enforce-eager" in sys.argv)
    ids = torch.randint(0, 1000, (context or 32768,)).tolist()
    rid = llm.engine.add_request(ids, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    if context:  # reserve the KV slots, skip the prefill (a decode step reads the same bytes)
        for seq in llm.engine.requests[rid]:
            seq.num_computed_tokens = seq.num_prompt_tokens
            seq.token_ids.append(0)
    for _ in range(3):  # prefill, then warm decode steps (graph capture happens here)
        llm.engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        llm.engine.step()
    torch.cuda.synchronize()
    print(f"context {context or 32768}: decode step {1e3 * (time.perf_counter() - t0) / 20:.3f} ms "
          "(20 steps, no profiler)")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(STEPS):
            llm.engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"),
                     key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels)
    print(f"kernels: {total / STEPS / 1e3:.3f} ms of GPU time per step")
    print(f"{'us/step':>9} {'us/call':>8} {'calls/step':>10}  kernel")
    for e in kernels[:30]:
        print(f"{e.self_device_time_total / STEPS:9.1f} {e.self_device_time_total / e.count:8.2f} "
              f"{e.count / STEPS:10.1f}  {e.key[:90]}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    if "--host" in sys.argv:
        host_profile(llm)


def host_profile(llm) -> None:
    """Host time per decode step: the replay call, the token wait (GPU work the host waits for), the rest."""
    import cProfile
    import pstats

    runner = llm.engine.runner.graph_runner
    spent = {"replay": 0.0, "sample (waits for the GPU)": 0.0}
    if runner is not None:
        for graph in runner.graphs.values():
            inner = graph.graph.replay

            def timed(inner=inner):
                t = time.perf_counter()
                inner()
                spent["replay"] += time.perf_counter() - t
            graph.graph.replay = timed
    sample = step_tokens.sample_batch  # the host sampler read_tokens calls

    def timed_sample(logits, seqs):
        t = time.perf_counter()
        out = sample(logits, seqs)
        spent["sample (waits for the GPU)"] += time.perf_counter() - t
        return out
    step_tokens.sample_batch = timed_sample
    steps = 30
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"host, per step of {1e3 * wall / steps:.3f} ms: " + ", ".join(
        f"{k} {1e3 * v / steps:.3f} ms" for k, v in spent.items())
        + f", everything else {1e3 * (wall - sum(spent.values())) / steps:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        llm.engine.step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
