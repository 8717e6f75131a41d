"""Hub IDs: LLM("org/name") loads the hub cache's snapshot offline, downloads only files that run no
code, and each failure is one sentence (no package, not cached while offline)."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch

from qwen1m import LLM
from qwen1m.errors import ConfigError
from qwen1m.hub import ALLOW_PATTERNS, looks_like_repo_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, checkpoint) -> None:
    """The layout huggingface_hub writes: refs/main names a commit, snapshots/<commit>/ holds the files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_id_loads_the_snapshot_with_the_folders_logits(tiny_checkpoint, offline_cache):
    hub_cache(offline_cache, "Qwen/Tiny-1M", tiny_checkpoint)
    ids = [3, 14, 15, 92, 65, 35]
    by_id = LLM("Qwen/Tiny-1M", dtype="float32", device="cpu", max_model_len=64)
    by_folder = LLM(tiny_checkpoint, dtype="float32", device="cpu", max_model_len=64)
    assert by_id.model_path == offline_cache / "models--Qwen--Tiny-1M" / "snapshots" / COMMIT
    torch.testing.assert_close(by_id.logits(ids), by_folder.logits(ids), rtol=0, atol=0)


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_cache(tmp_path / "hf" / "hub", "Qwen/Tiny-1M", tiny_checkpoint)
    assert resolve_model("Qwen/Tiny-1M") == tmp_path / "hf" / "hub" / "models--Qwen--Tiny-1M" / "snapshots" / COMMIT


def test_an_uncached_id_offline_says_where_it_looked(offline_cache):
    message = (f"model 'Qwen/Not-Here' is not a folder and is not in the Hugging Face cache at {offline_cache}, "
               "and offline mode is on (HF_HUB_OFFLINE=1).")
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        LLM("Qwen/Not-Here")


def test_without_huggingface_hub_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called Qwen/... here
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    message = ("model 'Qwen/Qwen2.5-7B-Instruct-1M' is not a folder; loading it as a Hugging Face Hub ID needs "
               "huggingface_hub: pip install 'qwen1m[hub]'.")
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        LLM("Qwen/Qwen2.5-7B-Instruct-1M")


def test_a_download_asks_only_for_files_that_run_no_code(offline_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):  # stands in for the network
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(offline_cache / "downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("Qwen/Remote") == offline_cache / "downloaded"
    assert [c.get("local_files_only") for c in calls] == [True, None]  # the cache is asked first
    allow, ignore = calls[1]["allow_patterns"], calls[1]["ignore_patterns"]
    assert allow == ALLOW_PATTERNS and {"*.safetensors", "*.json", "*.jinja"} <= set(allow)
    assert not any(p.endswith((".bin", ".pt", ".py")) for p in allow)
    assert {"*.bin", "*.pt", "*.py"} <= set(ignore)


def test_paths_and_ids_are_told_apart(tiny_checkpoint):
    assert resolve_model(tiny_checkpoint) == tiny_checkpoint  # an existing folder is never looked up
    assert resolve_model("/no/such/dir").as_posix() == "/no/such/dir"  # absolute: a path, not an ID
    assert looks_like_repo_id("Qwen/Qwen2.5-7B-Instruct-1M")
    assert not any(looks_like_repo_id(s) for s in ("./x/y", "../x", "a/b/c", "x", "org/..", "/org/name"))


def test_cli_model_flag_takes_a_hub_id(offline_cache, capsys):
    from qwen1m.cli import main

    assert main(["generate", "--model", "Qwen/Not-Here", "--prompt", "x", "--device", "cpu"]) == 2
    assert "is not in the Hugging Face cache at" in capsys.readouterr().err
