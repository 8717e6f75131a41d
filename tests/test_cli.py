"""The CLI: streams generation, prints one clear sentence and exits non-zero on bad input."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import save_tiny_checkpoint
from tokenizer_utils import make_tokenizer_folder

from qwen1m.cli import main

CHATML = (Path(__file__).parent / "fixtures" / "chatml_template.jinja").read_text()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from qwen1m.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("cli_model")
    make_tokenizer_folder(folder, CHATML)
    save_tiny_checkpoint(folder, seed=21, vocab_size=Tokenizer.from_folder(folder).vocab_size)
    return folder


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "qwen1m.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def test_generate_streams_the_same_text_as_the_api(text_model, capsys):
    from qwen1m import LLM, SamplingParams

    rc = main(["generate", "--model", str(text_model), "--prompt", "The dog", "--max-tokens", "8",
               "--ignore-eos", "--dtype", "float32", "--device", "cpu", "--temperature", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    expected = LLM(text_model, dtype="float32", device="cpu").generate(
        ["The dog"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].text
    assert printed == expected + "\n"


def test_generate_chat_and_prompt_file(text_model, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello there")
    rc = main(["generate", "--model", str(text_model), "--prompt-file", str(prompt), "--chat",
               "--max-tokens", "3", "--ignore-eos", "--device", "cpu", "-v"])
    assert rc == 0
    assert "generated 3" in capsys.readouterr().err


def test_generate_with_tensor_parallel_size_2(text_model, capsys):
    args = ["generate", "--model", str(text_model), "--prompt", "The dog", "--max-tokens", "6", "--ignore-eos",
            "--dtype", "float32", "--device", "cpu", "--temperature", "0"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main(args + ["--tensor-parallel-size", "2"]) == 0
    assert capsys.readouterr().out == one
    assert main(args + ["--enable-prefix-caching"]) == 0
    assert capsys.readouterr().out == one


def test_long_prompt_shows_a_progress_bar(text_model, capsys):
    rc = main(["generate", "--model", str(text_model), "--prompt", "The quick brown fox jumps. " * 12,
               "--max-tokens", "2", "--max-num-batched-tokens", "16", "--device", "cpu", "-v"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "memory plan on cpu" in err and "prefill [" in err and "tok/s" in err
    # stderr is not a terminal here (as in a log file or CI): whole lines, no carriage returns
    assert "\r" not in err
    assert any(line.startswith("prefill [") and line.endswith("tok/s done") for line in err.splitlines())


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist or is not a directory"),
    (["generate", "--model", "{model}", "--prompt-file", "/no/such/file"], "--prompt-file /no/such/file does not"),
    (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "-2"], "temperature must be >= 0"),
    (["generate", "--model", "{model}", "--prompt", "x", "--dca-local-size", "4"], "need --dca-chunk-size"),
    (["generate", "--model", "{model}", "--prompt", "x", "--dca-chunk-size", "8", "--dca-local-size", "8"],
     "local_size must be in"),
])
def test_bad_input_one_sentence_nonzero_exit(text_model, argv, message):
    argv = [a.replace("{model}", str(text_model)) for a in argv]
    out = subprocess.run([sys.executable, "-m", "qwen1m.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1


def test_demo_on_the_bundled_model_finds_the_pass_key(capsys):
    """The README's main job, at a short length so CI stays fast (the default is 8x the training length)."""
    assert main(["demo", "--length", "3000", "--depth", "30", "--strict", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pass key at depth 30%" in out  # --depth is in percent, as eval's --depths
    assert "CORRECT" in out and "attention: DCA" in out and "time to first token" in out
    # the key hides in text no training generator writes, asked in plain words (eval.heldout)
    assert "text: held-out 'reports' text, asked in plain words: 'Please recall the secret code" in out


def test_demo_without_dca_keeps_the_training_length(capsys):
    """--no-dca compares with plain RoPE at the same document length (8x = 32K tokens by default)."""
    assert main(["demo", "--length-factor", "1", "--no-dca", "--device", "cpu", "--families", "train"]) == 0
    out = capsys.readouterr().out
    assert "4,096 tokens = 1.0x the training length 4,096" in out and "attention: plain RoPE" in out
    assert "text: the training template" in out


def _with_generation_config(source: Path, folder: Path, config: dict) -> Path:
    shutil.copytree(source, folder)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_sampling_flags_default_to_the_models_generation_config(text_model, tmp_path, capsys):
    """Unset flags take generation_config.json, as LLM.generate without SamplingParams does, so the CLI and
    Python give the same text; do_sample false is greedy whatever temperature the file also gives."""
    from qwen1m import LLM, SamplingParams

    greedy = _with_generation_config(text_model, tmp_path / "greedy", {"do_sample": False, "temperature": 1.5})
    sampled = _with_generation_config(text_model, tmp_path / "sampled", {"temperature": 1.5, "top_k": 40})
    for folder, seed in ((greedy, None), (sampled, 7)):
        argv = ["generate", "--model", str(folder), "--prompt", "The dog", "--max-tokens", "8", "--ignore-eos",
                "--dtype", "float32", "--device", "cpu"] + (["--seed", str(seed)] if seed is not None else [])
        assert main(argv) == 0
        llm = LLM(folder, dtype="float32", device="cpu")
        params = SamplingParams(**{**llm.generation_defaults, "max_tokens": 8, "ignore_eos": True, "seed": seed})
        assert capsys.readouterr().out == llm.generate(["The dog"], params)[0].outputs[0].text + "\n"
    as_greedy = LLM(text_model, dtype="float32", device="cpu").generate(
        ["The dog"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].text
    assert main(argv[:-2] + ["--seed", "7"]) == 0 and capsys.readouterr().out != as_greedy + "\n"  # sampled


def test_given_flags_win_over_the_model_defaults():
    from qwen1m.cli import _sampling_params, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--top-k", "3", "--repetition-penalty", "1.2"])
    model = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 1000}
    params = _sampling_params(args, model)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 3, 1.2)
    assert params.max_tokens == 1000  # unset --max-tokens: the model's max_new_tokens, as on the server
    plain = _sampling_params(build_parser().parse_args(["generate", "--prompt", "x"]), {})
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p) == (1.0, 1.0, 0, 0.0)  # SamplingParams'
    assert plain.max_tokens == 256  # neither says: the CLI's default
    given = _sampling_params(build_parser().parse_args(["generate", "--prompt", "x", "--max-tokens", "9"]), model)
    assert given.max_tokens == 9


@pytest.mark.parametrize("token, message", [
    ("{vocab}", "error: --stop-token-id {vocab} is outside the model's vocabulary: token ids are in [0, {vocab})."),
    ("-1", "error: --stop-token-id -1 is negative; token ids are 0 or more."),
])
def test_stop_token_id_outside_the_vocabulary_is_refused(text_model, capsys, token, message):
    from qwen1m.config import load_model_config

    vocab = str(load_model_config(text_model).vocab_size)
    argv = ["generate", "--model", str(text_model), "--prompt", "x", "--device", "cpu", "--stop-token-id", "1",
            "--stop-token-id", token.replace("{vocab}", vocab)]
    assert main(argv) == 2
    assert capsys.readouterr().err == message.replace("{vocab}", vocab) + "\n"


def test_version_and_log_level_choices(capsys):
    from qwen1m import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"qwen1m {__version__}\n"
    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", "LOUD", "generate", "--prompt", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --log-level: invalid choice: 'LOUD' (choose from 'DEBUG', 'INFO', 'WARNING', 'ERROR', " in err
    from qwen1m.cli import build_parser

    assert build_parser().parse_args(["--log-level", "info"]).log_level == "INFO"  # any case


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from _all_parsers(sub)


def test_every_help_shows_the_defaults():
    from qwen1m.cli import build_parser

    checked = 0
    for parser in _all_parsers(build_parser()):
        text = " ".join(parser.format_help().split())  # argparse wraps lines where the width says
        for action in parser._actions:
            if not action.option_strings or action.default is None or action.default is False:
                continue  # nothing to show (identity: a default of 0 must be shown, and 0 == False)
            if action.default == argparse.SUPPRESS:
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            shown = f"default: {action.default})" in text or f"default: {action.default} " in text
            named = action.help and "default" in action.help and str(action.default) in action.help
            assert shown or named, f"{parser.prog} {action.option_strings[0]} hides its default {action.default!r}"
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("depth", ["150", "-1"])
def test_demo_depth_is_a_percentage(depth, capsys):
    assert main(["demo", "--depth", depth, "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: --depth {depth} must be between 0 and 100 percent.\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal_and_writes_bounded_lines_elsewhere():
    from qwen1m.cli_common import ProgressWriter

    now = [0.0]
    clock = lambda: now[0]  # noqa: E731 - a fake clock: the test sets the time
    log, tty = io.StringIO(), _Terminal()
    writers = [ProgressWriter(log, line_interval_s=10, clock=clock), ProgressWriter(tty, clock=clock)]
    for second in range(25):
        now[0] = float(second)
        for w in writers:
            w.write(f"at {second}", finished=second == 24)
    assert log.getvalue() == "at 0\nat 10\nat 20\nat 24\n"  # first, one per 10 s, and the last
    assert tty.getvalue().startswith("\rat 0   \rat 1   ") and tty.getvalue().endswith("\rat 24   \n")


def test_generate_default_max_tokens_is_cut_to_the_room_left(capsys):
    """The bundled model in an 80-token context: the unset --max-tokens (256) becomes the room the prompt
    leaves, while an explicit --max-tokens 256 that does not fit is an error naming it."""
    from qwen1m import LLM
    from qwen1m.cli import main

    prompt = "The grass is green. The sky is blue. " * 4
    n = len(LLM(max_model_len=80).get_tokenizer().encode(prompt))
    assert 20 < n < 70
    assert main(["generate", "--prompt", prompt, "--max-model-len", "80", "--ignore-eos", "-v", "--device",
                 "cpu"]) == 0
    assert f"generated {80 - n}," in capsys.readouterr().err
    assert main(["generate", "--prompt", prompt, "--max-model-len", "80", "--max-tokens", "256", "--device",
                 "cpu"]) != 0
    assert "max_tokens=256" in capsys.readouterr().err


def test_sparse_telemetry_flag_prints_the_report(text_model, tmp_path, capsys):
    """--sparse-telemetry (LLM's sparse_telemetry) reaches the engine: generate -v prints the density."""
    from qwen1m.config import load_model_config
    from qwen1m.sparse_config import SparseConfig

    cfg = load_model_config(text_model)
    path = tmp_path / "sparse.json"
    path.write_text(json.dumps(SparseConfig.uniform(cfg.num_hidden_layers, cfg.num_attention_heads, 4, 8).to_json()))
    argv = ["generate", "--model", str(text_model), "--prompt", "The quick brown fox jumps. " * 6, "--max-tokens", "2",
            "--device", "cpu", "--sparse-config", str(path), "--sparse-threshold", "1", "-v"]
    assert main(argv + ["--sparse-telemetry"]) == 0
    err = capsys.readouterr().err
    assert all(f"[sparse layer {layer}: density " in err for layer in range(cfg.num_hidden_layers))
    assert main(argv) == 0
    assert "[sparse layer" not in capsys.readouterr().err
