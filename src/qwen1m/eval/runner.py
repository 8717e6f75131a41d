"""Run an eval suite: jobs x modes, one LLM per mode, batched ``generate``, results kept in a JSON.

A job is (task, length, depth, sample index); its prompt is seeded by those and the run's seed, so
every mode sees the same tokens. As in RULER, a length L bounds the prompt plus the answer: the prompt
has exactly L - max_tokens tokens (the task's tokens_to_generate: 12 for passkey, 128 for niah_*),
so an L equal to the model's max_model_len still runs. Each mode builds its LLM once, submits its jobs in batches (up to
``batch_size`` prompts and ``TOKENS_PER_BATCH`` prompt tokens per ``generate`` call, so the engine
schedules many sequences per step), and frees the LLM before the next mode is built. The JSON is
rewritten after every batch; a rerun with the same --out skips every (task, mode, length, depth,
sample) already in it, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen1m.errors import Qwen1mError
from qwen1m.eval.scoring import sample_score
from qwen1m.eval.tasks import EvalContext, make_sample, task_spec

log = logging.getLogger(__name__)

MODES = ("rope", "dca", "dca+sparse")  # plain RoPE, DCA, DCA + sparse prefill
TOKENS_PER_BATCH = 1 << 23  # prompt tokens held per generate call: ~0.3 GB of Python lists


@dataclass(frozen=True, slots=True)
class Job:
    task: str
    length: int  # prompt + answer budget in tokens; the prompt is length - the task's max_tokens
    depth: float | None  # percent, for grid tasks (passkey); None: the task draws its own depths
    sample: int  # index among the samples of one (task, length, depth)

    def seed(self, base: int) -> str:
        return f"{base}/{self.task}/{self.length}/{self.depth}/{self.sample}"

    def key(self, mode: str) -> tuple:
        return (self.task, mode, self.length, self.depth, self.sample)


def passkey_jobs(lengths: list[int], depths: list[float], samples: int) -> list[Job]:
    return [Job("passkey", n, d, i) for n in lengths for d in depths for i in range(samples)]


def ruler_jobs(tasks: list[str], lengths: list[int], samples: int) -> list[Job]:
    return [Job(t, n, None, i) for n in lengths for t in tasks for i in range(samples)]


def record_key(r: dict[str, Any]) -> tuple:
    return (r["task"], r["mode"], r["length"], r["grid_depth"], r["sample"])


class ResultStore:
    """The run's JSON: ``{"meta": {...}, "samples": [record, ...]}``, rewritten atomically."""

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = meta
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                old, self.records = data["meta"], list(data["samples"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise Qwen1mError(f"{self.path} exists but is not an eval results file; use another --out.") from None
            for name in ("suite", "model", "seed", "families"):
                if old.get(name) != meta.get(name):
                    raise Qwen1mError(f"{self.path} holds results for {name}={old.get(name)!r}, not "
                                      f"{meta.get(name)!r}; use another --out to start a new run.")
        self._keys = {record_key(r) for r in self.records}

    def has(self, mode: str, job: Job) -> bool:
        return job.key(mode) in self._keys

    def add(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)
        self._keys.update(record_key(r) for r in records)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "samples": self.records}, indent=1))
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous file whole


@dataclass(slots=True)
class RunProgress:
    """Where a run stands, passed to the progress callback after every engine step and batch."""

    total_tokens: int  # prompt tokens of every job still to run when the run started
    total_samples: int
    mode: str = ""
    done_tokens: int = 0  # prompt tokens of finished batches
    done_samples: int = 0
    inflight: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens computed
    started: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return self.done_tokens + sum(self.inflight.values())

    @property
    def eta_s(self) -> float | None:
        done, elapsed = self.tokens, time.monotonic() - self.started
        return None if done == 0 else elapsed * (self.total_tokens - done) / done


def prompt_tokens(job: Job, families: str = "heldout") -> int:
    return job.length - task_spec(job.task, families).max_tokens


def _batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    out: list[list[Job]] = [[]]
    for j in jobs:
        if out[-1] and (len(out[-1]) >= batch_size or sum(x.length for x in out[-1]) + j.length > TOKENS_PER_BATCH):
            out.append([])
        out[-1].append(j)
    return [b for b in out if b]


def run_suite(jobs: list[Job], modes: list[str], make_llm: Callable[[str], Any], ec: EvalContext,
              store: ResultStore, seed: int = 0, batch_size: int = 64,
              progress: Callable[[RunProgress], None] | None = None) -> None:
    """Generate and score every job not yet in ``store``, mode by mode; ``make_llm(mode)`` -> LLM."""
    from qwen1m import SamplingParams

    todo = {m: [j for j in jobs if not store.has(m, j)] for m in modes}
    state = RunProgress(sum(j.length for m in modes for j in todo[m]), sum(len(t) for t in todo.values()))
    for mode in modes:
        if not todo[mode]:
            log.info("mode %s: all %d samples already in %s", mode, len(jobs), store.path)
            continue
        state.mode = mode
        llm = make_llm(mode)

        def on_step(p) -> None:
            state.inflight[p.request_id] = p.done
            if progress is not None:
                progress(state)

        for batch in _batches(todo[mode], batch_size):
            samples = [make_sample(ec, j.task, prompt_tokens(j, ec.families), j.depth, j.seed(seed)) for j in batch]
            specs = [task_spec(j.task, ec.families) for j in batch]
            params = [SamplingParams(max_tokens=spec.max_tokens, temperature=0.0) for spec in specs]
            outs = llm.generate([s.ids for s in samples], params, progress=on_step)
            records = []
            for j, s, o, spec in zip(batch, samples, outs, specs):
                got = o.outputs[0].text
                score = sample_score(spec.metric, got, s.answers)
                records.append({"task": j.task, "mode": mode, "length": j.length, "n_tokens": len(s.ids),
                                "grid_depth": j.depth, "depth": s.depth, "sample": j.sample,
                                "families": ec.families, "family": s.family, "phrasing": s.phrasing,
                                "expected": s.answers, "got": got, "score": score, "correct": score >= 100.0})
            store.add(records)
            state.inflight.clear()
            state.done_tokens += sum(j.length for j in batch)
            state.done_samples += len(batch)
            if progress is not None:
                progress(state)
        del llm  # the KV cache holds most of the device memory: free it before the next mode's LLM
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
