"""Server metrics in the Prometheus text format (version 0.0.4), written by hand.

Three metric kinds are enough: counters, gauges and histograms (cumulative ``_bucket{le=...}``,
``_sum`` and ``_count``). The engine thread updates them and HTTP handlers render them, so every
metric takes one shared lock; updates are a few additions, far below one engine step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

PREFIX = "qwen1m_"
# seconds; time to first token spans queueing and long prefills (a 1M-token prompt takes minutes)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], lock: threading.Lock):
        self.name, self.help, self.labelnames, self._lock = PREFIX + name, help, tuple(labelnames), lock

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, initial: Sequence[dict[str, str]] = ()):
        super().__init__(*args)
        self.name += "_total"  # text format 0.0.4: a counter's TYPE line names its _total samples
        # label sets listed up front appear as 0 before their first event, so rate() works at once
        self._values: dict[tuple[str, ...], float] = {self._key(lbl): 0.0 for lbl in initial}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}"
                                for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *args):
        super().__init__(*args)
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self._value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *args, buckets: Sequence[float]):
        super().__init__(*args)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)  # per bucket, not cumulative: summed in render()
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = next(i for i, b in enumerate(self.buckets) if value <= b)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def render(self) -> list[str]:
        lines, total = self.header(), 0
        for bound, count in zip(self.buckets, self._counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {total}')
        return lines + [f"{self.name}_sum {_number(self._sum)}", f"{self.name}_count {total}"]


class ServerMetrics:
    """Every metric /metrics shows."""

    def __init__(self):
        lock = threading.Lock()
        self._lock = lock
        reasons = [{"finish_reason": r} for r in ("stop", "length", "abort", "error")]
        self.requests = Counter("requests", "Engine requests that ended, by finish reason of their first "
                                "completion (abort: cancelled, e.g. the client disconnected).",
                                ["finish_reason"], lock, initial=reasons)
        self.http_requests = Counter("http_requests", "HTTP requests answered, by route and status code.",
                                     ["route", "status"], lock)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of accepted requests.", [], lock)
        self.generation_tokens = Counter("generation_tokens", "Generated tokens.", [], lock)
        self.prefix_cache_hit_tokens = Counter("prefix_cache_hit_tokens", "Prompt tokens taken from the prefix "
                                               "cache instead of computed (--enable-prefix-caching).", [], lock)
        tiers = [{"tier": t} for t in ("gpu", "host", "disk")]
        self.prefix_cache_tier_hit_tokens = Counter(
            "prefix_cache_tier_hit_tokens", "Prompt tokens taken from the prefix cache, by tier (gpu, host "
            "memory: --cpu-offload-gb, disk: --prefix-cache-dir).", ["tier"], lock, initial=tiers)
        self.prefix_cache_tier_read_bytes = Counter(
            "prefix_cache_tier_read_bytes", "KV bytes loaded into the GPU from the host and disk tiers.",
            ["tier"], lock, initial=tiers[1:])
        self.prefix_cache_tier_written_bytes = Counter(
            "prefix_cache_tier_written_bytes", "KV bytes copied into the host tier and written to the disk tier.",
            ["tier"], lock, initial=tiers[1:])
        self.prefix_cache_corrupt_files = Counter(
            "prefix_cache_corrupt_files", "Disk-tier files that failed their checks (deleted, recomputed).", [], lock)
        self.prefix_cache_dropped_blocks = Counter(
            "prefix_cache_dropped_blocks", "KV blocks that could not go a tier down (no free host slot, a full "
            "write queue, a failed write).", [], lock)
        self.preemptions = Counter("num_preemptions", "Sequences preempted (KV blocks freed, recomputed later) "
                                   "because an older one needed a block.", [], lock)
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "Seconds from arrival at the engine to the first generated token.",
            [], lock, buckets=TTFT_BUCKETS)
        self.inter_token_latency = Histogram(
            "inter_token_latency_seconds", "Seconds between successive engine steps that gave a request "
            "new tokens.", [], lock, buckets=ITL_BUCKETS)
        self.running = Gauge("num_requests_running", "Sequences running in the engine (one per completion: "
                             "n=3 counts 3).", [], lock)
        self.waiting = Gauge("num_requests_waiting", "Sequences queued for a free slot in the engine.",
                             [], lock)
        self.kv_cache_usage = Gauge("kv_cache_usage_perc", "Fraction of the KV cache held by running "
                                    "sequences (0 to 1).", [], lock)

    def add_tier_stats(self, now, before) -> None:
        """Add the prefix-cache tiers' counters (a ``cache.kv_tiers.TierStats``) grown since ``before``."""
        for tier, n in now.hit_tokens.items():
            self.prefix_cache_tier_hit_tokens.inc(n - before.hit_tokens[tier], tier=tier)
        for tier in ("host", "disk"):
            self.prefix_cache_tier_read_bytes.inc(now.read_bytes[tier] - before.read_bytes[tier], tier=tier)
            self.prefix_cache_tier_written_bytes.inc(now.written_bytes[tier] - before.written_bytes[tier], tier=tier)
        self.prefix_cache_corrupt_files.inc(now.corrupt_files - before.corrupt_files)
        self.prefix_cache_dropped_blocks.inc(now.dropped_blocks - before.dropped_blocks)

    def render(self) -> str:
        metrics = (self.requests, self.http_requests, self.prompt_tokens, self.generation_tokens,
                   self.prefix_cache_hit_tokens, self.prefix_cache_tier_hit_tokens, self.prefix_cache_tier_read_bytes,
                   self.prefix_cache_tier_written_bytes, self.prefix_cache_corrupt_files,
                   self.prefix_cache_dropped_blocks, self.preemptions, self.time_to_first_token,
                   self.inter_token_latency, self.running, self.waiting, self.kv_cache_usage)
        with self._lock:
            lines = [line for m in metrics for line in m.render()]
        return "\n".join(lines) + "\n"
