"""`qwen1m generate --prompt-file BOOK --question Q --prefix-cache-dir DIR` (design §4.3): a second question
about the same file, in a new process, takes the book's KV from disk and answers as without a cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _generate(book: Path, question: str, *extra: str) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, "-m", "qwen1m", "generate", "--prompt-file", str(book), "--question", question,
                        "--device", "cpu", "--max-tokens", "8", "-v", *extra],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


@pytest.mark.slow  # three processes of the bundled model (~50 s); the CPU benchmark runs the same path
def test_a_second_question_in_a_new_process_reads_the_book_from_disk(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(" ".join(f"Room {i} holds the {w} key." for i, w in enumerate(["red", "blue", "green"] * 40)))
    cache = str(tmp_path / "kv")
    _, first = _generate(book, "Which key is in room 7?", "--prefix-cache-dir", cache)
    assert "from the prefix cache" not in first
    answer, second = _generate(book, "Which key is in room 9?", "--prefix-cache-dir", cache)
    cached = int(second.split("[")[-1].split(" prompt tokens from the prefix cache")[0])
    prompt = int(second.split("[prompt ")[1].split(" tokens")[0])
    assert prompt - 2 * 64 <= cached < prompt  # all but the blocks holding the question (64-token blocks)
    plain, _ = _generate(book, "Which key is in room 9?")
    assert answer == plain
