"""Engine benchmark on Qwen2.5-7B-Instruct-1M shapes with random weights (load_format="dummy").

    PYTHONPATH=src python3 benchmarks/bench_engine.py --ttft 32768,131072 --decode 32768 --batch32 \
        [--hf-baseline 32768] [--kv-cache-dtype fp8]

Measures, in one process:
- time to first token (prefill of the whole prompt + the first sampled token) and peak GPU memory;
- decode latency per token at a context length (batch 1), against the floor of reading the weights and
  the whole KV cache once at the measured copy bandwidth (GPU.md: 4,266 GB/s):
      floor = (weight_bytes + context * kv_bytes_per_token) / bandwidth;
- decode throughput at batch 32 with 8K contexts;
- optionally transformers (sdpa attention, same random weights) as the baseline a user would pick.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402

from qwen1m import LLM, SamplingParams  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "qwen2.5-7b-instruct-1m"
COPY_BANDWIDTH = 4266e9  # bytes/s, device-to-device copy measured on the H200 (GPU.md)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ttft(llm: LLM, n: int) -> dict:
    ids = torch.randint(0, llm.config.vocab_size, (n,)).tolist()
    torch.cuda.reset_peak_memory_stats()
    shown = [0]

    def progress(p) -> None:  # a prompt of 256K+ tokens: print the rate, so a run cut short still tells
        step = 1 << 16 if p.total >= 1 << 19 else 1 << 17  # 15 lines for 1M tokens
        if p.total >= 1 << 18 and p.done - shown[0] >= step:
            shown[0] = p.done
            print(f"  prefill {p.done:,}/{p.total:,} tokens at {time.perf_counter() - t0:.1f} s", flush=True)

    _sync()
    t0 = time.perf_counter()
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), progress=progress)[0]
    _sync()
    t = time.perf_counter() - t0
    return {"tokens": n, "ttft_s": t, "prefill_tokens_per_s": n / t,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "generated": len(out.outputs[0].token_ids)}


def sparse_summary(llm: LLM) -> dict:
    """Density (computed / causal query-key pairs) and sampled-head recall since the last reset, per
    layer and overall."""
    report = llm.sparse_report()
    layers = {str(k): v for k, v in report.items()}
    density = [v["density"] for v in report.values()]
    recall = [r for v in report.values() for r in v["recall"]]
    return {"mean_density": sum(density) / max(1, len(density)),
            "mean_recall": sum(recall) / max(1, len(recall)), "layers": layers}


def decode(llm: LLM, context: int, batch: int, steps: int, skip_prefill: bool = False) -> dict:
    """Median interval between the returns of ``steps`` decode steps at ``context`` tokens (and the
    mean). skip_prefill: the prompts'
    KV slots are reserved but not computed (each sequence starts as if its prompt had been prefilled
    and one token sampled): a decode step reads the same bytes whatever they hold, and a 1M-token
    prefill would take minutes of device time for a number that does not depend on it."""
    prompts = [torch.randint(0, llm.config.vocab_size, (context,)).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    times = []
    for p in prompts:
        rid = llm.engine.add_request(p, params)
        if skip_prefill:
            for seq in llm.engine.requests[rid]:
                seq.num_computed_tokens = seq.num_prompt_tokens
                seq.token_ids.append(0)  # the "first sampled token": the sequence is decoding
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in llm.engine.scheduler.running) or \
            llm.engine.num_waiting():
        llm.engine.step()  # prefill (not timed); with skip_prefill only the admission
    # the interval between consecutive step() returns, i.e. between the tokens a caller receives,
    # with no synchronisation between steps: with overlapped decode the engine launches the next
    # step before it returns, so a sync per step would time host and GPU work back to back
    _sync()
    last = time.perf_counter()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    _sync()
    times = times[1:] or times  # the first interval includes the launch of the first graph replay
    mean = sum(times) / len(times)
    intervals_ms = [round(t * 1e3, 3) for t in times]
    times = sorted(times)
    step = times[len(times) // 2]
    weight_bytes = llm.memory_plan.weight_bytes
    kv_bytes = batch * context * llm.memory_plan.kv_bytes_per_token
    floor = (weight_bytes + kv_bytes) / COPY_BANDWIDTH
    return {"context": context, "batch": batch, "step_ms": step * 1e3, "mean_step_ms": mean * 1e3,
            "tokens_per_s": batch / step,
            "floor_ms": floor * 1e3, "ratio_to_floor": step / floor, "prefill_skipped": skip_prefill,
            "intervals_ms": intervals_ms}


def hf_baseline(n_list: list[int]) -> list[dict]:
    """transformers' Qwen2 (sdpa attention, the same shapes, random bf16 weights), as a user would run
    it: TTFT = generate() of one new token (warm: the first length runs once before it is timed);
    decode = the median of 32 single-token forwards on its cache after that prompt, synchronised
    each (the 2026-11-29 figures took (generate 33 - generate 1) / 32, which the prefill's run-to-run
    spread swamped: 72 ms at 32K against 55 ms at 128K). A length that does not fit says oom."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config.from_pretrained(CONFIG)
    cfg._attn_implementation = "sdpa"
    rows = []
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    for i, n in enumerate(n_list):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        try:
            if i == 0:
                _hf_ttft(model, ids)  # warm-up: kernel selection and allocator growth
            ttft = _hf_ttft(model, ids)
            decode = _hf_decode_ms(model, ids)
            rows.append({"tokens": n, "ttft_s": ttft, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "oom": False, "decode_ms_per_token": decode})
        except torch.OutOfMemoryError:
            rows.append({"tokens": n, "oom": True, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        print("transformers", rows[-1], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _hf_ttft(model, ids) -> float:
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    _sync()
    return time.perf_counter() - t0


def _hf_decode_ms(model, ids, steps: int = 32) -> float:
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        times = []
        for _ in range(steps):
            _sync()
            t0 = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync()
            times.append(time.perf_counter() - t0)
            past = out.past_key_values
    return sorted(times)[len(times) // 2] * 1e3


def sparse_config(kind: str, layers: int, heads: int):
    """'uniform': every head at (1000, 6096); '7b-mix': the most common Qwen2.5-7B-1M budgets (design §3.5:
    (1000, 6096) x321, (30, 800) x72, (3048, 8144) x68, then (7244, 12240) x273 and (11340, 16336) x50,
    counts chosen so the mean vertical size is the config's 3,920), spread over layers x heads."""
    from qwen1m.sparse_config import SparseConfig

    if kind == "uniform":
        return SparseConfig.uniform(layers, heads, 1000, 6096)
    mix = [(1000, 6096)] * 321 + [(30, 800)] * 72 + [(3048, 8144)] * 68 + [(7244, 12240)] * 273 + \
        [(11340, 16336)] * 50
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(mix), generator=g).tolist()
    flat = [mix[order[i % len(mix)]] for i in range(layers * heads)]
    v = tuple(tuple(flat[i * heads + h][0] for h in range(heads)) for i in range(layers))
    s = tuple(tuple(flat[i * heads + h][1] for h in range(heads)) for i in range(layers))
    return SparseConfig(v, s, tuple(tuple([None] * heads) for _ in range(layers)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ttft", default="32768,131072,262144")
    ap.add_argument("--decode", default="32768,131072")
    ap.add_argument("--batch32", action="store_true")
    ap.add_argument("--decode-steps", type=int, default=16, help="tokens generated per decode row")
    ap.add_argument("--skip-prefill", action="store_true",
                    help="decode rows: reserve the context's KV slots without computing them (see decode())")
    ap.add_argument("--hf-baseline", default="")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--attention-dtype", default="auto", help="fp8: dense prefill attention in e4m3")
    ap.add_argument("--max-model-len", type=int, default=1010000)
    ap.add_argument("--kv-cache-tokens", type=int, default=0,
                    help="size the KV cache for this many tokens (default: gpu_memory_utilization 0.9), so the "
                         "peak memory of a TTFT row is what that context needs, not what the GPU has")
    ap.add_argument("--sparse", default="", help="'uniform' or '7b-mix': sparse prefill above 32K tokens")
    ap.add_argument("--sparse-dense-above", type=float, default=None,
                    help="SparseConfig.dense_above_density (default 0.6; 1 keeps every region sparse)")
    ap.add_argument("--sparse-telemetry", action="store_true",
                    help="record each TTFT row's sparse density and sampled-head recall (LLM.sparse_report); "
                         "it adds a dense pass over one GQA group, so those rows' times are not comparable")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="no CUDA graphs (saves their capture in a TTFT-only run; decode rows get slower)")
    ap.add_argument("--name", default="", help="results file name (default engine, engine_sparse with --sparse)")
    args = ap.parse_args()
    name = args.name or ("engine_sparse" if args.sparse else "engine")
    results: dict = {"config": "qwen2.5-7b-instruct-1m (dummy weights, bf16)", "kv_cache_dtype": args.kv_cache_dtype,
                     "attention_dtype": args.attention_dtype}
    if args.hf_baseline:
        results["transformers_sdpa"] = hf_baseline(_ints(args.hf_baseline))
        print("transformers", results["transformers_sdpa"], flush=True)
        save(name, results)
    sparse = sparse_config(args.sparse, 28, 28) if args.sparse else None
    if sparse is not None and args.sparse_dense_above is not None:
        sparse = dataclasses.replace(sparse, dense_above_density=args.sparse_dense_above)
    results["sparse"] = args.sparse or None
    results["sparse_dense_above_density"] = sparse.dense_above_density if sparse is not None else None
    kv_memory = None
    if args.kv_cache_tokens:
        from qwen1m.cache.paged_kv import PagedKVCache
        from qwen1m.config import load_model_config

        cfg = load_model_config(CONFIG)
        per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                                 torch.bfloat16, args.kv_cache_dtype == "fp8")
        kv_memory = args.kv_cache_tokens * per_token
    t_start = time.perf_counter()
    llm = LLM(CONFIG, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=32, sparse_attention_config=sparse,
              kv_cache_memory=kv_memory, enforce_eager=args.enforce_eager, attention_dtype=args.attention_dtype,
              sparse_telemetry=args.sparse_telemetry and sparse is not None)
    results["sparse_telemetry"] = args.sparse_telemetry and sparse is not None
    results["memory_plan"] = str(llm.memory_plan)
    results["startup_s"] = time.perf_counter() - t_start
    print(llm.memory_plan, f"(engine ready after {results['startup_s']:.1f} s)", flush=True)
    results["ttft"] = []
    if _ints(args.ttft):  # warm-up, untimed: Triton compilation and kernel plans are not part of TTFT
        # (as for transformers, whose first length runs once before it is timed)
        llm.generate([torch.randint(0, llm.config.vocab_size, (min(_ints(args.ttft)[0], 32768),)).tolist()],
                     SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        results["ttft_warmup"] = "one untimed prompt of min(first length, 32768) tokens before the rows"
    for n in _ints(args.ttft):
        if results["sparse_telemetry"]:
            llm.model.backend.telemetry.reset()  # this row's prompt only
        results["ttft"].append(ttft(llm, n))
        if results["sparse_telemetry"]:
            results["ttft"][-1]["sparse"] = sparse_summary(llm)
        print("ttft", results["ttft"][-1], flush=True)
        save(name, results)  # after every row: a run cut by its time limit keeps what it measured
    results["decode"] = []
    for n in _ints(args.decode):
        results["decode"].append(decode(llm, n, 1, args.decode_steps, args.skip_prefill))
        print("decode", results["decode"][-1], flush=True)
        save(name, results)
    if args.batch32:
        results["decode"].append(decode(llm, 8192, 32, args.decode_steps, args.skip_prefill))
        print("decode", results["decode"][-1], flush=True)
    save(name, results)
    print("\n| what | figure |\n|---|---|")
    for r in results["ttft"]:
        print(f"| TTFT {r['tokens']:,} | {r['ttft_s']:.2f} s, peak {r['peak_gib']:.1f} GiB |")
    for r in results["decode"]:
        print(f"| decode ctx {r['context']:,} x{r['batch']} | {r['step_ms']:.2f} ms/step "
              f"(floor {r['floor_ms']:.2f} ms, {r['ratio_to_floor']:.2f}x) |")
    for r in results.get("transformers_sdpa", []):
        print(f"| transformers {r['tokens']:,} | " + ("OOM" if r["oom"] else
              f"TTFT {r['ttft_s']:.2f} s, decode {r.get('decode_ms_per_token', float('nan')):.2f} ms/token") + " |")


if __name__ == "__main__":
    main()
