"""Hugging Face Hub IDs as model names: ``LLM("Qwen/Qwen2.5-7B-Instruct-1M")``, ``--model Qwen/...``.

A name that is not an existing path and looks like ``org/name`` is looked up in the hub cache first
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), without the network. Only
when it is not there and ``HF_HUB_OFFLINE`` is not set is it downloaded, and then only the files
qwen1m reads: configs, tokenizer files, chat templates and safetensors weights. Pickles (``.bin``,
``.pt``) and Python files are never fetched: nothing runs code from a model folder. The lookup needs
``huggingface_hub`` (the ``hub`` extra); plain folders do not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qwen1m.errors import ConfigError

# what qwen1m reads from a model folder; everything else stays on the Hub
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]
# belt and braces: formats that execute code when loaded, or that qwen1m never reads
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.py", "*.msgpack", "*.h5", "*.onnx", "*.gguf"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` with the Hub's characters (no leading ``/`` or ``.``, no ``..``)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def hub_cache_dir() -> Path:
    """The cache huggingface_hub uses, read from the environment now (its constants are read at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in _TRUE


def resolve_model(model: str | Path) -> Path:
    """The folder of ``model``: the path itself when it exists or is no Hub ID, else the Hub snapshot."""
    path = Path(model)
    if path.exists() or not looks_like_repo_id(str(model)):
        return path
    return snapshot_folder(str(model))


def snapshot_folder(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id`` (``refs/main`` -> ``snapshots/<commit>``), downloaded first if
    it is missing and the network is allowed."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ConfigError(f"model {repo_id!r} is not a folder; loading it as a Hugging Face Hub ID needs "
                          "huggingface_hub: pip install 'qwen1m[hub]'.") from None
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise ConfigError(f"model {repo_id!r} is not a folder and is not in the Hugging Face cache at {cache}, "
                          "and offline mode is on (HF_HUB_OFFLINE=1).")
    return _download(snapshot_download, repo_id, cache)


def _download(snapshot_download, repo_id: str, cache: Path) -> Path:
    try:
        folder = snapshot_download(repo_id, cache_dir=cache, allow_patterns=ALLOW_PATTERNS,
                                   ignore_patterns=IGNORE_PATTERNS)
    except Exception as exc:  # network, authentication, no such repo: one sentence, not a traceback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ConfigError(f"model {repo_id!r} is not a folder and could not be downloaded from the Hugging Face "
                          f"Hub into {cache}: {reason}.") from None
    return Path(folder)
