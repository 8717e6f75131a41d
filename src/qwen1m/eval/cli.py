"""``qwen1m eval passkey`` and ``qwen1m eval ruler``: registered by ``qwen1m.cli`` through ``add_eval_command``.

Each run writes into --out: ``{suite}.json`` (every sample; a rerun resumes from it), ``{suite}.md``
(tables) and, for passkey, ``passkey_heatmap_{mode}.png``. Modes: rope = DCA off; dca = the
checkpoint's ``dual_chunk_attention_config`` (or --dca-chunk-size); dca+sparse = DCA plus sparse
prefill with --sparse-config, or else ``default_sparse_config``. A length L is RULER's: prompt plus
answer fit in L (the prompt has L minus the task's max_tokens), so L may equal max_model_len.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen1m.cli_common import ProgressWriter, load_llm
from qwen1m.engine_config import EngineConfig
from qwen1m.errors import Qwen1mError

# Qwen2.5-7B/14B-Instruct-1M ship chunk_size 262144 with sparse budgets (1000 vertical, 6096 slash) for
# most heads and sparse_attention_threshold 32768 (design §1.2, §3.5). The default config keeps those
# ratios to the model's DCA chunk size, so a model trained on 4K tokens gets the density Qwen's get at
# the same multiple of their training length; floors of one 64-key block of verticals and 256
# diagonals keep a tiny model's budgets from vanishing (they exceed the scaled 16 and 95).
QWEN_CHUNK_SIZE = 262144
QWEN_VERTICAL, QWEN_SLASH, QWEN_THRESHOLD = 1000, 6096, 32768
MIN_VERTICAL, MIN_SLASH = 64, 256


def default_sparse_config(cfg):
    """A uniform vertical-slash config scaled to ``cfg`` (a ModelConfig with DCA on): for the bundled
    model (chunk 4096): vertical 64, slash 256, sparse above 512 tokens, i.e. at every tested length."""
    from qwen1m.sparse_config import SparseConfig

    scale = cfg.dca.chunk_size / QWEN_CHUNK_SIZE
    return SparseConfig.uniform(cfg.num_hidden_layers, cfg.num_attention_heads,
                                max(MIN_VERTICAL, round(QWEN_VERTICAL * scale)),
                                max(MIN_SLASH, round(QWEN_SLASH * scale)),
                                threshold=max(1, round(QWEN_THRESHOLD * scale)))


def add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="long-context evaluation: passkey and RULER-style suites, locally generated")
    suites = p.add_subparsers(dest="suite", metavar="<suite>")
    pk = suites.add_parser("passkey", help="passkey retrieval over a length x depth grid (heatmaps)")
    pk.add_argument("--lengths", default="4k,8k,16k,32k,64k,128k", help="prompt lengths, e.g. 4k,8k,1m (k = 1024)")
    pk.add_argument("--depths", default="0:100:10", help="needle depths in percent: start:stop:step or a list")
    pk.add_argument("--samples", type=int, default=5, help="samples per length and depth")
    pk.add_argument("--no-heatmaps", action="store_true",
                    help="write no heatmap PNGs (they need matplotlib: pip install 'qwen1m[eval]')")
    ru = suites.add_parser("ruler", help="RULER's synthetic tasks (niah_*, vt, cwe, fwe; qa_1/qa_2 from local files)")
    ru.add_argument("--tasks", default="all", help="comma list of tasks, or 'all' (default)")
    ru.add_argument("--lengths", default="4k,8k,16k,32k,64k,128k", help="prompt lengths, e.g. 4k,8k,128k")
    ru.add_argument("--samples", type=int, default=10, help="samples per task and length")
    ru.add_argument("--squad", default=None, help="local SQuAD dev JSON for qa_1 (skipped without it)")
    ru.add_argument("--hotpotqa", default=None, help="local HotpotQA dev JSON for qa_2 (skipped without it)")
    for s in (pk, ru):
        s.add_argument("--out", default=f"eval_results/{s.prog.split()[-1]}", help="output folder")
        s.add_argument("--modes", default="rope,dca,dca+sparse", help="comma list of rope, dca, dca+sparse")
        s.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
        s.add_argument("--batch-size", type=int, default=_default_batch_size(),
                       help="prompts per generate call (the engine's max_num_seqs)")
        s.add_argument("--families", choices=("heldout", "train"), default="heldout",
                       help="haystacks and wordings: 'heldout' (never trained on; asked in plain words through "
                            "the chat template, the default) or 'train' (the training templates, with their "
                            "answer prefixes)")
        EngineConfig.add_cli_args(s, exclude=("max_num_seqs",))  # --batch-size sets it
        s.set_defaults(func=run_eval_command)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _default_batch_size() -> int:
    """A batch is what the engine runs at once by default."""
    return EngineConfig().max_num_seqs


def _modes(text: str) -> list[str]:
    from qwen1m.eval.runner import MODES

    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise Qwen1mError(f"--modes {text!r}: each mode must be one of {', '.join(MODES)}.")
    return modes


def _tasks(args: argparse.Namespace) -> list[str]:
    from qwen1m.eval.tasks import RULER_TASKS, TASKS

    if args.suite == "passkey":
        return ["passkey"]
    asked = RULER_TASKS if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in asked if t not in RULER_TASKS]
    if bad or not asked:
        raise Qwen1mError(f"--tasks {args.tasks!r}: unknown task(s) {bad}; known: {', '.join(RULER_TASKS)}.")
    files = {"squad": args.squad, "hotpotqa": args.hotpotqa}
    skipped = [t for t in asked if TASKS[t].needs and not files[TASKS[t].needs]]
    if skipped:
        print(f"skipping {', '.join(skipped)}: they need local data files "
              f"({', '.join('--' + TASKS[t].needs for t in skipped)} FILE; nothing is downloaded).", file=sys.stderr)
    tasks = [t for t in asked if t not in skipped]
    if not tasks:
        raise Qwen1mError("no task left to run.")
    return tasks


def _mode_options(mode: str, engine: EngineConfig, cfg) -> dict:
    """The EngineConfig fields ``mode`` sets over the flags' config ``engine``."""
    if mode == "rope":
        return dict(dca=None, sparse_attention_config=None)
    dca = engine.dca
    if dca == "auto" and cfg.dca is None:
        raise Qwen1mError(f"mode {mode} needs a dual_chunk_attention_config in the checkpoint's config.json "
                          "or --dca-chunk-size.")
    if mode == "dca":
        return dict(dca=dca, sparse_attention_config=None)
    sparse = engine.sparse_attention_config
    if sparse is None:
        raise Qwen1mError("mode dca+sparse needs a sparse config; --sparse-config none turns it off.")
    folder_json = Path(engine.model or "") / "sparse_attention_config.json"
    if sparse != "auto" or (engine.model and folder_json.is_file()):
        return dict(dca=dca, sparse_attention_config=sparse)
    from dataclasses import replace

    cfg_dca = cfg if dca == "auto" else replace(cfg, dca=dca)
    return dict(dca=dca, sparse_attention_config=default_sparse_config(cfg_dca))


def _describe_sparse(option: dict | None, threshold: int | None) -> dict | str | None:
    """The dca+sparse mode's sparse config as the JSON records it: a file path or the uniform budgets
    (``threshold``: --sparse-threshold, over the config's own)."""
    if option is None:
        return None
    sc = option["sparse_attention_config"]
    if isinstance(sc, str):
        return sc
    return {"vertical": sorted({v for row in sc.vertical_sizes for v in row}),
            "slash": sorted({v for row in sc.slash_sizes for v in row}),
            "threshold": threshold or sc.threshold}


def _progress_bar(stream=None):
    """samples done, share of prompt tokens done, ETA from the token rate so far (``ProgressWriter``:
    redrawn on a terminal, whole lines elsewhere)."""
    writer = ProgressWriter(stream)

    def show(p) -> None:
        finished = p.done_samples >= p.total_samples
        frac = p.tokens / max(1, p.total_tokens)
        width = 30
        eta = "done" if finished else ("ETA ?" if p.eta_s is None else f"ETA {p.eta_s:,.0f} s")
        writer.write(f"{p.mode:<10} [{'#' * int(width * frac)}{'.' * (width - int(width * frac))}] "
                     f"{p.done_samples}/{p.total_samples} samples, {frac:.0%} of prompt tokens, {eta}", finished)

    return show


def _check_heatmaps(args: argparse.Namespace) -> None:
    """Passkey heatmaps need matplotlib: say so before a long run rather than after it."""
    if args.suite != "passkey" or args.no_heatmaps:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Qwen1mError("eval passkey draws heatmaps with matplotlib, which is not installed: "
                          "pip install 'qwen1m[eval]', or pass --no-heatmaps.") from None


def run_eval_command(args: argparse.Namespace) -> int:
    from qwen1m.config import load_model_config
    from qwen1m.eval.context import EvalContext
    from qwen1m.eval.grid import length_label, parse_depths, parse_lengths
    from qwen1m.eval.qa import load_hotpotqa, load_squad
    from qwen1m.eval.report import summary_rows, write_report
    from qwen1m.eval.runner import ResultStore, passkey_jobs, record_key, ruler_jobs, run_suite
    from qwen1m.hub import resolve_model
    from qwen1m.llm import bundled_model_path
    from qwen1m.tokenizer import Tokenizer

    if args.no_dca:
        raise Qwen1mError("--no-dca does not apply to eval: --modes chooses (rope = DCA off).")
    if args.samples < 1 or args.batch_size < 1:
        raise Qwen1mError("--samples and --batch-size must be positive.")
    modes = _modes(args.modes)
    _check_heatmaps(args)
    lengths = parse_lengths(args.lengths)
    tasks = _tasks(args)
    if args.model:  # a Hub ID becomes its snapshot folder once, for every mode's LLM
        args.model = str(resolve_model(args.model))
    folder = Path(args.model) if args.model else bundled_model_path()
    cfg = load_model_config(folder)
    limit = args.max_model_len or cfg.max_position_embeddings
    if lengths[-1] > limit:
        where = "--max-model-len" if args.max_model_len else f"max_position_embeddings in {folder / 'config.json'}"
        raise Qwen1mError(f"--lengths {length_label(lengths[-1])} is {lengths[-1]} tokens, beyond the model's "
                          f"max_model_len {limit} ({where}).")
    need = lengths[-1]  # a length bounds prompt + answer (runner.prompt_tokens)
    engine = EngineConfig.from_cli_args(args, max_model_len=need, max_num_seqs=args.batch_size)
    options = {m: _mode_options(m, engine, cfg) for m in modes}  # errors before any model is built
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise Qwen1mError(f"eval needs the model's tokenizer, but {folder} has no tokenizer.json.")
    qa = {}
    if getattr(args, "squad", None) and "qa_1" in tasks:
        qa["squad"] = load_squad(args.squad)
    if getattr(args, "hotpotqa", None) and "qa_2" in tasks:
        qa["hotpotqa"] = load_hotpotqa(args.hotpotqa)
    try:
        ec = EvalContext.build(Tokenizer.from_folder(folder).backend, qa, families=args.families)
    except ValueError as e:  # no <|im_start|> / <|im_end|>: the prompts are ChatML
        raise Qwen1mError(f"eval prompts use ChatML, but the tokenizer in {folder}: {e}") from None
    if args.suite == "passkey":
        jobs = passkey_jobs(lengths, parse_depths(args.depths), args.samples)
    else:
        jobs = ruler_jobs(tasks, lengths, args.samples)
    out = Path(args.out)
    meta = {"suite": args.suite, "model": str(folder.resolve()), "seed": args.seed, "families": args.families,
            "modes": modes,
            "lengths": lengths, "tasks": tasks,
            "sparse": _describe_sparse(options.get("dca+sparse"), engine.sparse_threshold),
            "sparse_dense_above": engine.sparse_dense_above}  # None: SparseConfig's default
    store = ResultStore(out / f"{args.suite}.json", meta)

    def make_llm(mode: str):
        print(f"mode {mode}: loading {folder}", file=sys.stderr)
        return load_llm(engine.replace(**options[mode]))

    run_suite(jobs, modes, make_llm, ec, store, seed=args.seed, batch_size=args.batch_size,
              progress=_progress_bar())
    wanted = {j.key(m) for j in jobs for m in modes}  # the JSON may also hold other lengths or depths
    done = [r for r in store.records if record_key(r) in wanted]
    paths = write_report(done, args.suite, meta, out, heatmaps=not getattr(args, "no_heatmaps", True))
    for mode, row in summary_rows(done).items():
        cells = "  ".join(f"{length_label(n)} {s:5.1f}" for n, s in row.items())
        print(f"{mode:<10} {cells}")
    for path in [store.path, *paths]:
        print(f"wrote {path}")
    return 0
