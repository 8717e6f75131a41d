"""The CLI: streams generation, prints one clear sentence and exits non-zero on bad input."""

from __future__ import annotations

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
               "--ignore-eos", "--dtype", "float32", "--device", "cpu"])
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
            "--dtype", "float32", "--device", "cpu"]
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
    assert main(["demo", "--length", "3000", "--depth", "0.3", "--strict", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CORRECT" in out and "attention: DCA" in out and "time to first token" in out
    # the key hides in text no training generator writes, asked in plain words (eval.heldout)
    assert "text: held-out 'reports' text, asked in plain words: 'Please recall the secret code" in out


def test_demo_without_dca_keeps_the_training_length(capsys):
    """--no-dca compares with plain RoPE at the same document length (8x = 32K tokens by default)."""
    assert main(["demo", "--length-factor", "1", "--no-dca", "--device", "cpu", "--families", "train"]) == 0
    out = capsys.readouterr().out
    assert "4,096 tokens = 1.0x the training length 4,096" in out and "attention: plain RoPE" in out
    assert "text: the training template" in out
