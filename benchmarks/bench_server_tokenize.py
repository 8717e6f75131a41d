"""What tokenizing a large prompt costs everyone else: the event loop's stall, thread vs worker process.

Run on the CPU:  PYTHONPATH=src python3 benchmarks/bench_server_tokenize.py [--mib 8] [--out DIR]

An asyncio task ticks every 5 ms and records how late each tick runs while one prompt of --mib MiB
of English text is encoded with the bundled model's tokenizer (Qwen's byte-level BPE) (a) in a thread,
as ``asyncio.to_thread(tokenizer.encode, text)`` did, and (b) in the server's worker process
(``qwen1m.server.tokenize.TokenizerPool``). A late tick is time /health and every stream's next event
would also have waited. Writes tokenize_<date>.json under --out (default $OUT or benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import time
from pathlib import Path

from qwen1m.llm import bundled_model_path
from qwen1m.server.tokenize import TokenizerPool
from qwen1m.tokenizer import Tokenizer

TICK_S = 0.005


async def stall_during(work) -> tuple[float, float]:
    """(seconds the work took, the largest delay of a 5 ms tick meanwhile)."""
    worst, done = 0.0, False

    async def ticker():
        nonlocal worst
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(TICK_S)
            worst = max(worst, time.perf_counter() - start - TICK_S)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - start
    done = True
    await tick
    return elapsed, worst


async def main(mib: float) -> dict:
    tokenizer = Tokenizer.from_folder(bundled_model_path())
    words = "the quick brown fox jumps over the lazy dog while long context models read whole books "
    text = (words * int(mib * (1 << 20) / len(words) + 1))[: int(mib * (1 << 20))]
    pool = TokenizerPool(tokenizer, max_model_len=1 << 30)
    pool.start()
    await pool.encode("warm up")  # the worker's start is not part of a request's cost
    thread_s, thread_stall = await stall_during(lambda: asyncio.to_thread(tokenizer.encode, text))
    process_s, process_stall = await stall_during(lambda: pool.encode(text))
    pool.shutdown()
    return {"text_mib": mib, "tokens": len(tokenizer.encode(text)), "thread_s": thread_s,
            "thread_worst_tick_delay_s": thread_stall, "process_s": process_s,
            "process_worst_tick_delay_s": process_stall}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=8.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    result = asyncio.run(main(args.mib))
    out = Path(args.out) / f"tokenize_{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    print(f"wrote {out}")
