"""Soak (slow): 1,100 requests, 32 at a time, with random hang-ups and bad requests mixed in, on a
KV cache small enough that sequences are preempted and recomputed.

Afterwards the engine holds nothing (KV usage 0, no request running, waiting, tracked or queued) and
the process's memory is flat: within 10% of what it was after the first 200 requests (allocator
pools and caches warm by then). Run with ``pytest -m slow tests/server/test_soak.py -s`` to see the
figures.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest
from live_server import TIMEOUT, running, text_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from qwen1m import LLM  # noqa: E402
from qwen1m.cache.paged_kv import PagedKVCache  # noqa: E402
from qwen1m.server.app import build_app  # noqa: E402

NUM_REQUESTS = 1100
CONCURRENCY = 32
WARM_UP = 200
WORDS = "the quick brown fox jumps over the lazy dog while long context models read whole books".split()
BAD = [  # the abusive requests, with the status each gets; none may hurt anyone else
    ({"prompt": "hi", "max_tokens": 2, "n": 2, "seed": 18446744073709551615}, 400),
    ({"prompt": "hi \ud800"}, 400),
    ({"prompt": "hi", "temperature": 1e-300, "max_tokens": 3}, 200),
    ({"prompt": "hi", "max_tokens": "x" * 10000}, 400),
]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def one(client: httpx.AsyncClient, rng: random.Random, stats: dict) -> None:
    roll = rng.random()
    if roll < 0.05:
        body, status = rng.choice(BAD)
        # ASCII JSON: a lone surrogate goes as the \ud800 escape, as the probe sent it
        response = await client.post("/v1/completions", content=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        key = "bad_as_expected" if response.status_code == status else "bad_unexpected"
        stats[key] = stats.get(key, 0) + 1
        return
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
    body = {"prompt": prompt, "max_tokens": rng.randint(1, 40), "n": rng.choice((1, 1, 1, 2, 3)),
            "temperature": rng.choice((0, 0.8)), "seed": rng.randint(0, 2**64 - 4), "ignore_eos": True}
    hang_up = rng.random() < 0.25
    if rng.random() < 0.5:
        body["stream"] = True
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if hang_up and len(events) >= rng.randint(1, 4):
                    stats["hung_up"] = stats.get("hung_up", 0) + 1
                    return  # leaving the block closes the connection mid-stream
            assert events[-1] == "[DONE]" and '"error"' not in events[-2], events[-2:]
    else:
        task = asyncio.ensure_future(client.post("/v1/completions", json=body))
        if hang_up:
            await asyncio.sleep(rng.random() * 0.05)
            task.cancel()
            stats["hung_up"] = stats.get("hung_up", 0) + 1
            try:
                await task
            except (asyncio.CancelledError, httpx.HTTPError):
                pass
            return
        response = await task
        assert response.status_code == 200, response.text
    stats["ok"] = stats.get("ok", 0) + 1


@pytest.mark.slow
def test_soak(tmp_path):
    folder = text_checkpoint(tmp_path / "soak")
    roomy = LLM(folder, dtype="float32", device="cpu", max_model_len=512)
    cfg = roomy.config
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                             roomy.dtype, False)
    del roomy
    # KV for 1,024 tokens: 16 sequences of up to ~140 tokens outgrow it, so sequences are preempted
    llm = LLM(folder, dtype="float32", device="cpu", max_model_len=512, max_num_seqs=16, block_size=16,
              kv_cache_memory=1024 * per_token)
    holder = {}

    def build(server):
        holder["app"] = build_app(llm, model_name="tiny")
        return holder["app"]

    with running(build) as (_, url):
        app = holder["app"]
        rng = random.Random(19)
        stats: dict[str, int] = {}
        rss = {}

        async def main():
            queue: asyncio.Queue = asyncio.Queue()
            for i in range(NUM_REQUESTS):
                queue.put_nowait(i)

            async def worker():
                limits = httpx.Limits(max_connections=1)
                async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT * 4, limits=limits) as client:
                    while not queue.empty():
                        i = queue.get_nowait()
                        if i == WARM_UP:
                            rss["warm"] = rss_bytes()
                        await one(client, rng, stats)

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

        start = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - start
        deadline = time.monotonic() + TIMEOUT
        engine, loop, serving = llm.engine, app.state.engine_loop, app.state.serving
        while engine.has_unfinished_requests() or loop._tracked or serving.gate.queued:
            assert time.monotonic() < deadline, "requests left behind"
            time.sleep(0.05)
        rss["end"] = rss_bytes()
        metrics = httpx.get(url + "/metrics", timeout=TIMEOUT).text
        print(f"\nsoak: {NUM_REQUESTS} requests, {CONCURRENCY} concurrent, {elapsed:.1f} s "
              f"({NUM_REQUESTS / elapsed:.1f} req/s); {stats}; RSS after {WARM_UP} requests "
              f"{rss['warm'] / 2**20:.0f} MiB, at the end {rss['end'] / 2**20:.0f} MiB; "
              f"preemptions {engine.scheduler.num_preemptions}")
        assert engine.scheduler.num_preemptions > 0  # the soak went through preemption and recompute
        assert stats.get("bad_unexpected", 0) == 0 and stats["ok"] > NUM_REQUESTS // 2 and stats["hung_up"] > 100
        assert engine.kv_cache_usage() == 0.0 and engine.requests == {}
        assert not loop.streams and serving.gate.queued == 0
        assert "qwen1m_kv_cache_usage_perc 0" in metrics and "qwen1m_num_requests_running 0" in metrics
        assert rss["end"] < 1.1 * rss["warm"], rss
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          timeout=TIMEOUT).status_code == 200
