"""The main job: find a pass key hidden in a document far longer than the model was trained on.

``qwen1m demo`` hides a pass key in ``length_factor`` times the model's training length (the DCA
chunk_size of the bundled model) of text from a held-out family (``eval.heldout``: text and wording no
training generator writes; "reports" by default), asks for it in plain words through the chat
template as ``llm.chat`` does, answers greedily through Dual Chunk Attention and prints the answer,
whether it is right, the time to first token and the decode speed. ``--families train`` uses the
design §6.1 passkey prompt the model was trained on instead.
"""

from __future__ import annotations

import argparse
import time

from qwen1m.cli_common import load_llm, progress_printer
from qwen1m.engine_config import EngineConfig
from qwen1m.errors import Qwen1mError
from qwen1m.eval.heldout import FAMILIES as HELDOUT_FAMILIES


def training_length(llm) -> int:
    """The length the model was trained to: its checkpoint's DCA chunk_size (also when DCA is switched
    off for a comparison), else max_position_embeddings."""
    from qwen1m.config import load_model_config

    dca = llm.config.dca or load_model_config(llm.model_path).dca
    return dca.chunk_size if dca is not None else llm.config.max_position_embeddings


def run_demo(args: argparse.Namespace) -> int:
    from qwen1m import SamplingParams
    from qwen1m.eval.heldout import passkey_document
    from qwen1m.train.data import passkey_prompt
    from qwen1m.train.scoring import passkey_correct

    if not 0 <= args.depth <= 100:
        raise Qwen1mError(f"--depth {args.depth:g} must be between 0 and 100 percent.")
    depth = args.depth / 100
    llm = load_llm(EngineConfig.from_cli_args(args))
    if llm.tokenizer is None:
        raise Qwen1mError(f"the demo needs a tokenizer, but {llm.model_path} has no tokenizer.json.")
    train_len = training_length(llm)
    length = args.length if args.length is not None else args.length_factor * train_len
    if length + args.max_tokens > llm.engine.max_model_len:
        raise Qwen1mError(
            f"a {length:,}-token document does not fit max_model_len={llm.engine.max_model_len:,}; "
            "pass a smaller --length or --length-factor."
        )
    if args.families == "train":
        prompt, answer = passkey_prompt(llm.tokenizer, length, depth, args.seed)
        what = "the training template (docs/design.md §6.1 filler and wording)"
    else:  # the same prompt llm.chat([{"role": "user", "content": message}]) sends, streamed here
        message, answer = passkey_document(llm.tokenizer.encode, args.family, length, depth, args.seed)
        prompt = llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True))
        what = f"held-out '{args.family}' text, asked in plain words: {message.splitlines()[-1]!r}"
    mode = "DCA" if llm.config.dca is not None else "plain RoPE"
    print(f"model: {llm.model_path}")
    print(
        f"document: {len(prompt):,} tokens = {len(prompt) / train_len:.1f}x the training length {train_len:,}; "
        f"pass key at depth {depth:.0%}; attention: {mode}"
    )
    print(f"text: {what}")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    start = time.monotonic()
    last = None
    for out in llm.generate_stream(
        prompt, params, progress=progress_printer(llm.engine.max_num_batched_tokens)
    ):
        last = out
    total = time.monotonic() - start
    text = last.outputs[0].text.strip()
    ttft = last.metrics.time_to_first_token or total
    n_out = len(last.outputs[0].token_ids)
    decode_rate = (n_out - 1) / max(total - ttft, 1e-9) if n_out > 1 else 0.0
    correct = passkey_correct(text, answer)
    print(f"answer: {text!r}")
    print(f"expected: {answer} -> {'CORRECT' if correct else 'WRONG'}")
    print(
        f"time to first token: {ttft:.2f} s ({len(prompt) / ttft:,.0f} prompt tokens/s); "
        f"decode: {decode_rate:.1f} tokens/s"
    )
    return 0 if correct or not args.strict else 1


def add_demo_command(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job: a pass key hidden in a long document, answered through DCA"
    )
    p.add_argument(
        "--length-factor", type=int, default=8, help="document length in training lengths (default 8)"
    )
    p.add_argument(
        "--length", type=int, default=None, help="document length in tokens (overrides the factor)"
    )
    p.add_argument("--depth", type=float, default=50.0,
                   help="where the pass key sits, in percent: 0 (start) to 100 (end), as eval's --depths")
    p.add_argument("--families", choices=("heldout", "train"), default="heldout",
                   help="text the model never trained on, asked in plain words (default), or the training template")
    p.add_argument("--family", choices=HELDOUT_FAMILIES, default="reports",
                   help="which held-out text (default reports)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document and pass key")
    p.add_argument("--max-tokens", type=int, default=16, help="most tokens of the answer")
    p.add_argument("--strict", action="store_true", help="exit 1 when the answer is wrong")
    EngineConfig.add_cli_args(p)
    p.set_defaults(func=run_demo)
