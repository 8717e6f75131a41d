"""The server's latency targets under abuse, measured on a running ``qwen1m serve`` (the bundled model, CPU).

Run:  PYTHONPATH=src python3 benchmarks/bench_server_limits.py [--repeats 5] [--max-model-len 2048]

Three figures, each the worst of --repeats tries (tests/server/test_limits.py checks the behaviour
behind them without timing it):
- ``413_s``: a client posts a 50 MB body; seconds until its 413 (target < 1 s: the body is not read);
- ``health_worst_s``: the slowest /health answer while that happens (target < 0.1 s);
- ``small_while_n6_s``: a 4-token completion sent while an n=6 chat generates (target < 5 s: no
  head-of-line blocking).
Writes server_limits_<date>.json under $OUT or benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
from common import save


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_model_len: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen1m", "serve", "--device", "cpu", "--dtype", "float32",
                             "--max-model-len", str(max_model_len), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "QWEN1M_API_KEY": ""})
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("qwen1m serve did not start")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def big_body(url: str, payload: bytes) -> tuple[float, float]:
    """(seconds to the 413, slowest /health meanwhile)."""
    latencies, stop = [], threading.Event()

    def poll():
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.get(url + "/health")
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.perf_counter()
    response = httpx.post(url + "/v1/completions", content=payload, timeout=30,
                          headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - start
    stop.set()
    poller.join()
    if response.status_code != 413:
        raise SystemExit(f"expected 413 for a 50 MB body, got {response.status_code}")
    return elapsed, max(latencies)


def small_while_busy(url: str) -> float:
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "n": 6, "stream": True,
            "ignore_eos": True, "temperature": 0, "max_tokens": 400}
    with httpx.Client(timeout=120) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as big:
        contents = 0
        for line in big.iter_lines():  # until all six generate
            contents += line.startswith("data: ") and '"content":"' in line and '"content":""' not in line
            if contents >= 6:
                break
        start = time.perf_counter()
        small = httpx.post(url + "/v1/completions", timeout=120,
                           json={"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        elapsed = time.perf_counter() - start
        if small.status_code != 200:
            raise SystemExit(f"the small request got {small.status_code}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()
    payload = json.dumps({"prompt": "x" * (50 << 20)}).encode()
    proc, url = start_server(args.max_model_len)
    try:
        runs = [big_body(url, payload) for _ in range(args.repeats)]
        small = [small_while_busy(url) for _ in range(args.repeats)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    result = {"repeats": args.repeats, "max_model_len": args.max_model_len, "cpu_count": os.cpu_count(),
              "413_s": max(r[0] for r in runs), "health_worst_s": max(r[1] for r in runs),
              "small_while_n6_s": max(small), "targets": {"413_s": 1.0, "health_worst_s": 0.1, "small_while_n6_s": 5.0}}
    for key in ("413_s", "health_worst_s", "small_while_n6_s"):
        print(f"{key:18s} {result[key]:.3f} s (target < {result['targets'][key]} s)")
    save("server_limits", result)


if __name__ == "__main__":
    main()
