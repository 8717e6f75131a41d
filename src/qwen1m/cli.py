"""One entry point: ``qwen1m <command>``. The CLI prints; the library logs.

Every Qwen1mError (bad checkpoint, option or request) ends the command with its one-sentence
message on stderr and exit status 2; nothing prints a traceback at the user.

This module holds the parser, ``generate`` and ``calibrate``; the other commands live in their own
modules and register here (``_add_optional_commands``). What the commands share (the model flags of
``EngineConfig``, ``load_llm``, progress lines) is in ``qwen1m.cli_common``, so none of them imports
this module.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

from qwen1m.cli_common import load_llm, progress_printer
from qwen1m.engine_config import EngineConfig
from qwen1m.errors import Qwen1mError

# flag -> SamplingParams field of the sampling flags that default to the model's generation_config.json
_MODEL_DEFAULT_FLAGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty"}


CLI_MAX_TOKENS = 256  # generate's answer length when neither the flag nor generation_config.json says


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens to generate (default: the model's max_new_tokens, else {CLI_MAX_TOKENS}; "
                        "either is cut to the room the prompt leaves in --max-model-len, while a value given here "
                        "that does not fit is an error)")
    g = p.add_argument_group(
        "sampling (unset flags take the model's generation_config.json, else SamplingParams' defaults: the same "
        "rule as LLM.generate and the server)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (0 or -1: all)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below this share of the likeliest")
    g.add_argument("--repetition-penalty", type=float, default=None, help="HF's repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=None, help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _explicit_sampling(args: argparse.Namespace) -> dict:
    """The SamplingParams fields the command line sets; the sampling flags left unset are absent."""
    fields = {field: getattr(args, flag) for flag, field in _MODEL_DEFAULT_FLAGS.items()
              if getattr(args, flag) is not None}
    if args.max_tokens is not None:
        fields["max_tokens"] = args.max_tokens
    return dict(fields, seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos)


def _check_stop_token_ids(ids: list[int] | None, vocab_size: int | None) -> None:
    """--stop-token-id must name a token of the model: negative ids before loading, the vocabulary after."""
    for t in ids or []:
        if t < 0:
            raise Qwen1mError(f"--stop-token-id {t} is negative; token ids are 0 or more.")
        if vocab_size is not None and t >= vocab_size:
            raise Qwen1mError(f"--stop-token-id {t} is outside the model's vocabulary: token ids are in "
                              f"[0, {vocab_size}).")


def _sampling_params(args: argparse.Namespace, generation_defaults: dict | None = None):
    """The flags given, over the model's generation_config.json (``llm.generation_defaults``)."""
    from qwen1m import SamplingParams

    _check_stop_token_ids(args.stop_token_id, None)
    return SamplingParams(**{"max_tokens": CLI_MAX_TOKENS, **(generation_defaults or {}), **_explicit_sampling(args)})


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    try:
        return sys.stdin.read() if args.prompt_file == "-" else path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Qwen1mError(f"--prompt-file {path} does not exist.") from None
    except UnicodeDecodeError:
        raise Qwen1mError(f"--prompt-file {path} is not UTF-8 text.") from None
    except OSError as e:
        raise Qwen1mError(f"--prompt-file {path} could not be read: {e.strerror}.") from None


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    if getattr(args, "question", None):  # after the document: questions about one file share its prefix
        prompt = f"{prompt}\n\n{args.question}"
    _sampling_params(args)  # a bad flag is refused before the model loads
    llm = load_llm(EngineConfig.from_cli_args(args))
    _check_stop_token_ids(args.stop_token_id, llm.config.vocab_size)
    params = _sampling_params(args, llm.generation_defaults)
    if args.chat:
        if llm.tokenizer is None:
            raise Qwen1mError(f"--chat needs a tokenizer, but {llm.model_path} has no tokenizer.json.")
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = llm.tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True)
    if llm.tokenizer is not None:  # tokenised once: the default answer length needs the prompt's
        prompt = llm.tokenizer.encode(prompt)
    if args.max_tokens is None:  # a default must fit: cut it to the room the prompt leaves
        room = llm.engine.max_model_len - len(prompt) if isinstance(prompt, list) else CLI_MAX_TOKENS
        params.max_tokens = max(1, min(params.max_tokens, room))
    if args.verbose:
        print(f"[{llm.memory_plan}]", file=sys.stderr)
    start = time.monotonic()
    last = None
    for out in llm.generate_stream(prompt, params, progress=progress_printer(llm.engine.max_num_batched_tokens)):
        sys.stdout.write(out.new_text[0])
        sys.stdout.flush()
        last = out
    sys.stdout.write("\n")
    if last is not None and args.verbose:
        n_out = len(last.outputs[0].token_ids)
        ttft = last.metrics.time_to_first_token if last.metrics else None
        total = time.monotonic() - start
        print(f"[prompt {len(last.prompt_token_ids)} tokens, generated {n_out}, "
              f"time to first token {ttft:.2f} s, {n_out / max(total, 1e-9):.1f} tokens/s overall, "
              f"finish_reason={last.outputs[0].finish_reason}]", file=sys.stderr)
        if last.num_cached_tokens:
            print(f"[{last.num_cached_tokens} prompt tokens from the prefix cache]", file=sys.stderr)
        if llm.engine_config.sparse_telemetry and llm.sparse_config is not None:
            _print_sparse_report(llm.sparse_report())
    return 0


def _print_sparse_report(report: dict) -> None:
    """--sparse-telemetry: per layer, the share of causal pairs sparse prefill computed and its recall."""
    for layer, row in report.items():
        recall = f", recall {sum(row['recall']) / len(row['recall']):.3f}" if row["recall"] else ""
        print(f"[sparse layer {layer}: density {row['density']:.3f}{recall}]", file=sys.stderr)


def _calibration_ids(llm, data: str, length: int, sample: int) -> list[int]:
    """Token ids of one calibration sequence of exactly ``length`` tokens."""
    if data == "synthetic":
        from qwen1m.train.corpus import grammar_paragraphs

        text = "\n\n".join(grammar_paragraphs(max(8, length // 40), seed=1000 + sample))
    else:
        path = Path(data)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise Qwen1mError(f"--data {path} does not exist (give a UTF-8 text file or 'synthetic').") from None
        except (UnicodeDecodeError, OSError):
            raise Qwen1mError(f"--data {path} could not be read as UTF-8 text.") from None
    ids = llm.tokenizer.encode(text)
    if not ids:
        raise Qwen1mError(f"--data {data} holds no text.")
    start = (sample * 7919) % len(ids)  # different samples start at different places of the text
    ids = ids[start:] + ids[:start]
    return (ids * (length // len(ids) + 1))[:length]


def cmd_calibrate(args: argparse.Namespace) -> int:
    from qwen1m import SamplingParams
    from qwen1m.attention.calibrate import RecallProbe, refine, save_heatmap
    from qwen1m.sparse_config import SparseConfig, load_sparse_config

    if not 0 < args.target_recall <= 1:
        raise Qwen1mError(f"--target-recall must be in (0, 1], got {args.target_recall}.")
    if args.step < 1 or args.max_steps < 0:
        raise Qwen1mError("--step must be positive and --max-steps >= 0.")
    from dataclasses import replace

    from qwen1m.config import load_model_config
    from qwen1m.hub import resolve_model
    from qwen1m.llm import bundled_model_path

    config = EngineConfig.from_cli_args(args, sparse_attention_config=None)
    cfg = load_model_config(bundled_model_path() if config.model is None else resolve_model(config.model))
    if args.base:
        base = load_sparse_config(args.base, cfg.num_hidden_layers, cfg.num_attention_heads)
    else:
        base = SparseConfig.uniform(cfg.num_hidden_layers, cfg.num_attention_heads, args.base_vertical,
                                    args.base_slash)
    # the probe goes to the attention backend when it is built: every prefill runs dense, and the probe
    # measures what each head's sparse budgets would have recalled
    probe = RecallProbe(replace(base, threshold=1), args.step, args.max_steps)
    llm = load_llm(config, recall_probe=probe)
    if llm.tokenizer is None and args.data != "synthetic":
        raise Qwen1mError(f"--data needs a tokenizer, but {llm.model_path} has no tokenizer.json.")
    for sample in range(args.samples):
        ids = _calibration_ids(llm, args.data, args.length, sample)
        print(f"calibration sample {sample + 1}/{args.samples}: {len(ids):,} tokens", file=sys.stderr)
        llm.generate([ids], SamplingParams(max_tokens=1, temperature=0),
                     progress=progress_printer(llm.engine.max_num_batched_tokens))
    refined, summary = refine(probe, args.target_recall)
    Path(args.out).write_text(json.dumps(refined.to_json(), indent=1))
    print(f"{'layer':>5} {'recall@base':>11} {'recall@chosen':>13} {'raised':>6} {'below':>5}")
    for row in summary:
        print(f"{row.layer:>5} {row.base_recall:>11.4f} {row.final_recall:>13.4f} {row.raised:>6} "
              f"{row.below_target:>5}")
    print(f"wrote {args.out} ({sum(r.raised for r in summary)} heads raised, "
          f"{sum(r.below_target for r in summary)} still below {args.target_recall} at the largest budget)")
    if args.heatmap and save_heatmap(refined, args.heatmap):
        print(f"wrote {args.heatmap}")
    return 0


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it or there is none
    to show (None: decided later, e.g. by the model; False: a switch that is off)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action = copy.copy(action)  # the parser's own action keeps its help
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        named = "default" in text and str(action.default) in text  # e.g. "(default 8)" written by hand
        if _shows_default(action) and not named and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _shows_default(action: argparse.Action) -> bool:
    # identity, not ==: a default of 0 is worth showing, and 0 == False
    hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
    return (bool(action.option_strings) and not hidden
            and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)))


class ArgumentParser(argparse.ArgumentParser):
    """The CLI's parsers, subcommands' included (argparse builds those with ``type(parent)``): each
    help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from qwen1m import __version__

    parser = ArgumentParser(prog="qwen1m", description="Qwen models on contexts up to 1M tokens.")
    parser.add_argument("--version", action="version", version=f"qwen1m {__version__}")
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="log messages of this level and above")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    gen = sub.add_parser("generate", help="generate text from a prompt, streaming tokens to stdout")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text ('-' for stdin)")
    gen.add_argument("--question", default=None,
                     help="text appended after the prompt (file): with --prefix-cache-dir, another question "
                          "about the same file reuses the file's KV instead of prefilling it again")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--system", default=None, help="system message for --chat")
    gen.add_argument("-v", "--verbose", action="store_true", help="print token counts and timings to stderr")
    EngineConfig.add_cli_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate", help="refine a sparse config by attention recall (writes the JSON)")
    cal.add_argument("--data", default="synthetic", help="a UTF-8 text file, or 'synthetic' (default)")
    cal.add_argument("--length", type=int, required=True, help="tokens per calibration sequence")
    cal.add_argument("--samples", type=int, default=1, help="calibration sequences (default 1)")
    cal.add_argument("--target-recall", type=float, default=0.9, help="attention recall each head must reach")
    cal.add_argument("--base", default=None, help="starting sparse_attention_config.json (default uniform)")
    cal.add_argument("--base-vertical", type=int, default=1000, help="uniform base vertical size (docs/design.md §3.5)")
    cal.add_argument("--base-slash", type=int, default=6096, help="uniform base slash size (docs/design.md §3.5)")
    cal.add_argument("--step", type=int, default=2048, help="budget increment on both sizes (docs/design.md §3.5)")
    cal.add_argument("--max-steps", type=int, default=6, help="largest increment tried = step * max-steps")
    cal.add_argument("--out", default="sparse_attention_config.json", help="the refined config's path")
    cal.add_argument("--heatmap", default=None, help="PNG of recall per layer x head (needs matplotlib)")
    EngineConfig.add_cli_args(cal)
    cal.set_defaults(func=cmd_calibrate)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands that live in their own modules register themselves here."""
    from qwen1m.cli_demo import add_demo_command
    from qwen1m.server.cli import add_serve_command

    add_demo_command(sub)
    add_serve_command(sub)
    from qwen1m.eval.cli import add_eval_command

    add_eval_command(sub)
    try:
        from qwen1m.train.cli import add_train_command
    except ImportError:
        return
    add_train_command(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except Qwen1mError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
