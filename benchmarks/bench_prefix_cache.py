"""A long document prefilled once: follow-up questions from the GPU, host-memory and disk tiers.

GPU (default): Qwen2.5-7B-Instruct-1M shapes, random bf16 weights (``load_format="dummy"``), DCA on,
one engine with ``cpu_offload_gb`` (room for the document) and ``prefix_cache_dir``:
    1. document (--tokens, 256K) + question: computed in full, time to first token (the baseline);
    2. decode step time (batch 1, a 1K-token prompt) while that request's blocks are being written
       to disk, then again with the writer idle; and how long the writes took;
    3. follow-ups (another --question-token question, the same length: the same YaRN factor) from
       the GPU tier; from host memory after the GPU tier is cleared; from disk in a fresh LLM after
       the first is deleted and the files dropped from the page cache (posix_fadvise DONTNEED);
       each as a fraction of the full prefill;
    4. with --parts 256k,1m: the same from disk for a ~1M-token document with an FP8 KV cache, if
       the folder's disk has room for its KV (checked first; otherwise skipped with the reason).
       Dense 1M prefill took 376 s on the H200 (engine_1m_2026-11-29.json): run it alone, and where
       one command may not run that long, in two: ``--stage write`` (the full prefill, the files
       written under --dir, the row saved there as stage_write.json) then ``--stage read`` (a new
       process: the follow-up from disk). The document is drawn from a seeded generator, so both
       processes make the same tokens.

CPU (``--device cpu``): the bundled model through the CLI, each run a new process:
    qwen1m generate --prompt-file BOOK --question Q1 --prefix-cache-dir DIR   (prefills the book)
    qwen1m generate --prompt-file BOOK --question Q2 --prefix-cache-dir DIR   (reads it from disk)
    qwen1m generate --prompt-file BOOK --question Q2                          (no cache: the answer to match)
Target: the second is >= 5x faster to its first token, with the same answer. float32 reuses blocks
only at an equal YaRN factor, so Q1 and Q2 are picked to give prompts of equal token length.

    PYTHONPATH=src python benchmarks/bench_prefix_cache.py                       # H200, < 8 min
    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --parts 1m            # the 1M FP8 part alone
    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --parts 1m --dir D --stage write   # then:
    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --parts 1m --dir D --stage read
    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --device cpu --tokens 32768

Prints the rows and saves JSON (``prefix_cache_tiers_<date>.json``) under $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from qwen1m import LLM, SamplingParams  # noqa: E402
from qwen1m.cache.paged_kv import PagedKVCache  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "qwen2.5-7b-instruct-1m"
ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ttft(llm: LLM, ids: list[int]) -> tuple[float, int]:
    _sync()
    t0 = time.perf_counter()
    out = llm.generate([ids], ONE)[0]
    _sync()
    return time.perf_counter() - t0, out.num_cached_tokens


def _decode_step_s(llm: LLM, vocab: int, steps: int = 128) -> float:
    """Median seconds between successive tokens of one 1K-token prompt's decode."""
    times = []
    for _ in llm.generate([torch.randint(0, vocab, (1024,)).tolist()],
                          SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True), stream=True):
        times.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(times[1:], times[2:]))


def _clear_gpu_tier(llm: LLM) -> None:
    """Evict every idle prefix-cache block from the GPU (they are in host memory already)."""
    engine = llm.engine
    engine.block_pool.free(engine.prefix_cache.evict(engine.prefix_cache.num_idle))


def _drop_page_cache(folder: Path) -> bool:
    """Ask the kernel to forget the cached pages of the block files, so a read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.rglob("*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _kv_gb(llm_cfg, tokens: int, fp8: bool) -> float:
    per_token = PagedKVCache.bytes_per_token(llm_cfg.num_hidden_layers, llm_cfg.num_key_value_heads,
                                             llm_cfg.head_dim, torch.bfloat16, fp8)
    return tokens * per_token / 2**30


def _make_llm(tokens: int, folder: Path, host_gb: float, fp8: bool) -> LLM:
    return LLM(CONFIG, load_format="dummy", dtype="bfloat16", max_model_len=tokens + 4096,
               kv_cache_dtype="fp8" if fp8 else "auto", cpu_offload_gb=host_gb, prefix_cache_dir=folder)


def _free_gpu() -> None:
    """After the caller has dropped its last reference to an LLM: give its memory back."""
    gc.collect()
    torch.cuda.empty_cache()


def _document(tokens: int, question: int, vocab: int) -> tuple[list[int], list[list[int]]]:
    """The document and four questions, the same in every process (a seeded generator)."""
    g = torch.Generator().manual_seed(tokens)
    doc = torch.randint(0, vocab, (tokens,), generator=g).tolist()
    return doc, [torch.randint(0, vocab, (question,), generator=g).tolist() for _ in range(4)]


def gpu_part(tokens: int, question: int, folder: Path, fp8: bool, full_run: bool, stage: str = "both") -> dict:
    """stage: "both" (one process), "write" (the full prefill and the disk writes; the row is saved in
    the folder) or "read" (the follow-up from disk in this new process, completing that row)."""
    import json

    from qwen1m.config import load_model_config

    cfg = load_model_config(CONFIG)
    kv_gb = _kv_gb(cfg, tokens, fp8)
    host_gb = 1.05 * kv_gb + 0.5
    saved = folder / "stage_write.json"
    if stage == "read":
        row = json.loads(saved.read_text())
        doc, qs = _document(tokens, question, cfg.vocab_size)
        return _disk_followup(row, tokens, folder, host_gb, fp8, doc, qs, warm_up=True)
    row: dict = {"document_tokens": tokens, "question_tokens": question, "kv_cache_dtype": "fp8" if fp8 else "bf16",
                 "document_kv_gib": kv_gb}
    free_gb = shutil.disk_usage(folder).free / 2**30
    if free_gb < 1.1 * kv_gb + 2:
        row["skipped"] = f"the disk under {folder} has {free_gb:.1f} GiB free; the document's KV needs {kv_gb:.1f} GiB"
        print(row["skipped"], flush=True)
        return row
    t0 = time.perf_counter()
    llm = _make_llm(tokens, folder, host_gb, fp8)
    row["startup_s"] = time.perf_counter() - t0
    vocab = llm.config.vocab_size
    llm.generate([torch.randint(0, vocab, (8192,)).tolist()], SamplingParams(max_tokens=2, ignore_eos=True))
    doc, qs = _document(tokens, question, vocab)
    row["full_prefill_ttft_s"], _ = _ttft(llm, doc + qs[0])
    print(f"{tokens:,} tokens: full prefill {row['full_prefill_ttft_s']:.2f} s", flush=True)
    disk = llm.engine.kv.tiers.disk
    t_write = time.perf_counter()
    if full_run:
        row["writes_in_flight_at_decode"] = disk._queue.unfinished_tasks > 0
        row["decode_step_ms_write_in_flight"] = 1e3 * _decode_step_s(llm, vocab)
    llm.engine.kv.tiers.flush()
    row["disk_write_s"] = time.perf_counter() - t_write  # request end -> all on disk (the decode ran meanwhile)
    row["disk_written_gib"] = disk.written_bytes / 2**30
    if full_run:
        row["decode_step_ms_writer_idle"] = 1e3 * _decode_step_s(llm, vocab)
        row["gpu_followup_s"], row["gpu_followup_cached"] = _ttft(llm, doc + qs[1])
        _clear_gpu_tier(llm)
        host_before = llm.engine.kv.stats().hit_tokens["host"]
        row["host_followup_s"], row["host_followup_cached"] = _ttft(llm, doc + qs[2])
        row["host_hit_tokens"] = llm.engine.kv.stats().hit_tokens["host"] - host_before
    llm.engine.kv.tiers.flush()
    del llm, disk
    _free_gpu()
    if stage == "write":
        saved.write_text(json.dumps(row))
        print(f"  written: {row['disk_written_gib']:.1f} GiB in {row['disk_write_s']:.1f} s; row saved in {saved}")
        return row
    return _disk_followup(row, tokens, folder, host_gb, fp8, doc, qs)


def _disk_followup(row: dict, tokens: int, folder: Path, host_gb: float, fp8: bool, doc, qs,
                   warm_up: bool = False) -> dict:
    """The follow-up from disk in a fresh LLM (a restart), the page cache dropped first. warm_up: this
    is a new process, so compile the kernels on an unrelated short prompt first, as the one-process
    run had done before its fresh LLM (its kernels were compiled already)."""
    row["page_cache_dropped"] = _drop_page_cache(folder)
    fresh = _make_llm(tokens, folder, host_gb, fp8)  # a restart: nothing in GPU or host memory
    if warm_up:
        g = torch.Generator().manual_seed(-1)
        fresh.generate([torch.randint(0, fresh.config.vocab_size, (8192,), generator=g).tolist()],
                       SamplingParams(max_tokens=2, ignore_eos=True))
        row["page_cache_dropped"] = _drop_page_cache(folder)  # the warm-up read no document block
    row["disk_followup_s"], row["disk_followup_cached"] = _ttft(fresh, doc + qs[3])
    row["disk_hit_tokens"] = fresh.engine.kv.stats().hit_tokens["disk"]
    fresh.engine.kv.tiers.flush()
    del fresh
    _free_gpu()
    full = row["full_prefill_ttft_s"]
    for tier in ("gpu", "host", "disk"):
        if f"{tier}_followup_s" in row:
            s, cached = row[f"{tier}_followup_s"], row[f"{tier}_followup_cached"]
            row[f"{tier}_followup_fraction"] = s / full
            print(f"  follow-up from {tier}: {s:.3f} s = {s / full:.4f} of the full prefill "
                  f"({cached:,} tokens reused)", flush=True)
    if "decode_step_ms_writer_idle" in row:
        print(f"  decode step {row['decode_step_ms_writer_idle']:.2f} ms with the writer idle, "
              f"{row['decode_step_ms_write_in_flight']:.2f} ms with {row['disk_written_gib']:.1f} GiB being written "
              f"(the writes took {row['disk_write_s']:.1f} s)", flush=True)
    return row


# ---- CPU: the CLI, a new process per question ------------------------------------------------------
def _cli(book: Path, question: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "qwen1m", "generate", "--prompt-file", str(book), "--question", question,
           "--device", "cpu", "--max-tokens", "16", "-v", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
    wall = time.perf_counter() - t0
    ttft = float(re.search(r"time to first token ([\d.]+) s", r.stderr).group(1))
    cached = re.search(r"\[(\d+) prompt tokens from the prefix cache\]", r.stderr)
    return {"ttft_s": ttft, "process_s": wall, "answer": r.stdout.strip(), "cached_tokens": int(cached.group(1))
            if cached else 0}


def cpu_part(tokens: int) -> dict:
    from qwen1m.llm import bundled_model_path
    from qwen1m.tokenizer import Tokenizer
    from qwen1m.train.corpus import grammar_paragraphs

    tok = Tokenizer.from_folder(bundled_model_path())
    paragraphs, kept, count = grammar_paragraphs(tokens // 10 + 8, seed=22), [], 0
    for p in paragraphs:  # whole paragraphs up to about the length (counted one by one: linear)
        n = len(tok.encode(p + "\n\n"))
        if count + n > tokens - 128:
            break
        kept.append(p)
        count += n
    text = "\n\n".join(kept) + "\n\n"
    by_len: dict[int, list[str]] = {}
    for i in range(200):  # two questions whose prompts have the same length (float32: the same YaRN m)
        q = f"Question {i}: what does the paragraph about the {['river', 'tower', 'garden', 'market'][i % 4]} say?"
        by_len.setdefault(len(tok.encode(text.rstrip("\n") + "\n\n" + q)), []).append(q)
    q1, q2 = next(v for v in by_len.values() if len(v) >= 2)[:2]
    work = Path(tempfile.mkdtemp(prefix="qwen1m_bench_"))
    book = work / "book.txt"
    book.write_text(text.rstrip("\n"))
    cache = str(work / "kv")
    try:
        first = _cli(book, q1, "--prefix-cache-dir", cache)
        print(f"first question (prefill): time to first token {first['ttft_s']:.2f} s", flush=True)
        second = _cli(book, q2, "--prefix-cache-dir", cache)
        print(f"second question, new process, from disk: {second['ttft_s']:.2f} s "
              f"({second['cached_tokens']:,} tokens reused)", flush=True)
        plain = _cli(book, q2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"document_tokens": len(tok.encode(text.rstrip("\n"))), "first": first, "second_from_disk": second,
           "second_without_cache": plain, "ttft_speedup": first["ttft_s"] / second["ttft_s"],
           "same_answer": second["answer"] == plain["answer"]}
    print(f"speedup to the first token {row['ttft_speedup']:.1f}x (target >= 5x); same answer as without a "
          f"cache: {row['same_answer']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", type=int, default=None, help="document tokens (default 262144 GPU, 32768 CPU)")
    ap.add_argument("--question", type=int, default=64, help="question tokens (GPU)")
    ap.add_argument("--parts", default="256k", help="GPU parts, comma separated: 256k (bf16, all tiers), "
                    "1m (FP8, from disk)")
    ap.add_argument("--dir", default=None, help="prefix cache folder (default: a temporary folder, removed after)")
    ap.add_argument("--config", default=None,
                    help="model config folder (dummy weights; default: Qwen2.5-7B-Instruct-1M)")
    ap.add_argument("--stage", default="both", choices=["both", "write", "read"],
                    help="the 1m part in two processes: write (full prefill, files under --dir), then read")
    ap.add_argument("--read-threads", type=int, default=None,
                    help="disk block reads in parallel (default: the engine's kv_tiers.READ_THREADS)")
    args = ap.parse_args()
    global CONFIG
    CONFIG = Path(args.config) if args.config else CONFIG
    import qwen1m.cache.kv_tiers as kv_tiers

    if args.read_threads:
        kv_tiers.READ_THREADS = args.read_threads  # read when the engine makes its reader pool
    if args.device == "cpu":
        save("prefix_cache_tiers_cpu", {"config": "bundled model (float32, DCA), qwen1m generate CLI",
                                        "rows": [cpu_part(args.tokens or 32768)]})
        return
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="qwen1m_kv_", dir=os.environ.get("TMPDIR")))
    rows = []
    try:
        for part in args.parts.split(","):
            folder = root / part
            folder.mkdir(parents=True, exist_ok=True)
            if part == "256k":
                rows.append(gpu_part(args.tokens or 262144, args.question, folder, fp8=False, full_run=True))
            elif part == "1m":  # --tokens, if given, replaces 1M (a small check of the two stages)
                if args.stage != "both" and not args.dir:
                    raise SystemExit("--stage write / read needs --dir (the files outlive the process)")
                rows.append(gpu_part(args.tokens or 1_000_000, args.question, folder, fp8=True, full_run=False,
                                     stage=args.stage))
            else:
                raise SystemExit(f"--parts: unknown part {part!r} (256k, 1m)")
            save("prefix_cache_tiers", {"config": "qwen2.5-7b-instruct-1m (dummy weights, bf16), DCA on",
                                        "read_threads": kv_tiers.READ_THREADS, "rows": rows})
            if not args.dir:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
