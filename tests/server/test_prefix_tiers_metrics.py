"""/metrics and usage.prompt_tokens_details.cached_tokens with the host and disk tiers."""

from __future__ import annotations

import re

import pytest
from live_server import text_checkpoint

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from qwen1m import LLM  # noqa: E402
from qwen1m.server.app import build_app  # noqa: E402

DOC = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _ask(client: TestClient, question: str) -> int:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": f"{DOC}\n{question}",
                                             "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_metrics_count_hits_and_bytes_per_tier(tmp_path):
    folder = text_checkpoint(tmp_path / "model")
    opts = dict(dtype="float32", device="cpu", block_size=16, max_model_len=1024, prefix_cache_dir=tmp_path / "kv")
    first = LLM(folder, **opts)
    with TestClient(build_app(first, model_name="tiny"), base_url="http://localhost") as client:
        assert _ask(client, "Who jumps?") == 0
        gpu = _ask(client, "Who sleeps?")
        text = client.get("/metrics").text
    assert gpu >= 64
    assert _metric(text, 'qwen1m_prefix_cache_tier_hit_tokens_total{tier="gpu"}') == gpu
    assert _metric(text, 'qwen1m_prefix_cache_tier_hit_tokens_total{tier="disk"}') == 0
    assert _metric(text, 'qwen1m_prefix_cache_tier_written_bytes_total{tier="host"}') > 0
    first.engine.kv.tiers.flush()
    restarted = LLM(folder, **opts)  # another server on the same folder: the document comes from disk
    with TestClient(build_app(restarted, model_name="tiny"), base_url="http://localhost") as client:
        disk = _ask(client, "Who runs?")
        text = client.get("/metrics").text
    assert disk == gpu
    assert _metric(text, 'qwen1m_prefix_cache_tier_hit_tokens_total{tier="disk"}') == disk
    assert _metric(text, "qwen1m_prefix_cache_hit_tokens_total") == disk
    assert _metric(text, 'qwen1m_prefix_cache_tier_read_bytes_total{tier="disk"}') > 0
    assert _metric(text, "qwen1m_prefix_cache_corrupt_files_total") == 0
