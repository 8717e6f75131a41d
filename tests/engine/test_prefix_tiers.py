"""Prefix-cache tiers (design §4.3): host memory and disk under the GPU prefix cache.

Every test compares greedy float32 outputs with an engine without any cache, on the tiny DCA
checkpoint (original length 16: the YaRN temperature m > 1 and grows with the prompt length, so the
follow-up questions have the first question's length), and asserts how many prompt tokens each tier
served, so that a test cannot pass by never reusing anything."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoints import save_tiny_checkpoint

from qwen1m import LLM, DCAConfig, SamplingParams
from qwen1m.cache.prefix_cache import PrefixCache

DCA = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 16}  # blocks of 4 tokens
BLOCK_BYTES = 2 * 2 * 2 * 4 * 16 * 4  # layers x (k, v) x kv heads x block x head_dim x float32
PER_TOKEN = BLOCK_BYTES // 4
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
DOC, QUESTION = 60, 4  # 15 full document blocks; prompts of 64 tokens: the same m for every question


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiers_dca"), seed=32,
                                extra_config={"dual_chunk_attention_config": DCA})


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


DOCS = [_ids(DOC, 100 + d) for d in range(3)]
FIRST = [doc + _ids(QUESTION, 200 + d) for d, doc in enumerate(DOCS)]
FOLLOW = [doc + _ids(QUESTION, 300 + d) for d, doc in enumerate(DOCS)]


def _llm(ckpt, **kw) -> LLM:
    kw.setdefault("block_size", 4)
    kw.setdefault("max_num_batched_tokens", 48)
    kw.setdefault("dtype", "float32")
    return LLM(ckpt, device="cpu", **kw)


def _small_gpu() -> dict:
    """28 GPU blocks: one 70-token sequence at a time, the previous document's blocks evicted."""
    return {"kv_cache_memory": 112 * PER_TOKEN, "max_model_len": 110}


@pytest.fixture(scope="module")
def want(ckpt):
    plain = _llm(ckpt)
    return {tuple(p): plain.generate([p], GREEDY)[0].outputs[0].token_ids for p in FIRST + FOLLOW}


def _run(llm: LLM, prompts, want) -> list[int]:
    """Generate each prompt alone; check the tokens; return the cached token counts."""
    cached = []
    for p in prompts:
        out = llm.generate([p], GREEDY)[0]
        assert out.outputs[0].token_ids == want[tuple(p)]
        cached.append(out.num_cached_tokens)
    return cached


def _stats(llm: LLM):
    return llm.engine.kv.stats()


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/??/*.kv"))


def _block_file(llm: LLM, prompt: list[int], i: int) -> Path:
    return llm.engine.kv.tiers.disk.path(PrefixCache(4).keys(prompt, i + 1)[i])


def test_gpu_evictions_go_to_host_memory(ckpt, want):
    llm = _llm(ckpt, cpu_offload_gb=1e-3, **_small_gpu())
    assert llm.engine.prefix_cache is not None and llm.engine.kv.tiers.disk is None
    assert _run(llm, FIRST, want) == [0, 0, 0]
    # the last document's blocks are still on the GPU; the first two only in host memory
    assert _run(llm, FOLLOW, want) == [60, 60, 60]
    stats = _stats(llm)
    assert stats.hit_tokens["host"] >= 120 and stats.hit_tokens["disk"] == 0
    assert stats.read_bytes["host"] == stats.hit_tokens["host"] // 4 * BLOCK_BYTES


def test_host_evictions_go_to_disk_and_a_restart_reads_them(ckpt, want, tmp_path):
    host_blocks = 20  # fewer than two documents' 16 blocks each
    opts = dict(cpu_offload_gb=host_blocks * BLOCK_BYTES / 2**30, prefix_cache_dir=tmp_path, **_small_gpu())
    llm = _llm(ckpt, **opts)
    assert llm.engine.kv.tiers.host.pool.num_blocks == host_blocks
    assert _run(llm, FIRST, want) == [0, 0, 0]
    llm.engine.kv.tiers.flush()
    assert _run(llm, FOLLOW, want) == [60, 60, 60]
    assert _stats(llm).hit_tokens["disk"] >= 60
    llm.engine.kv.tiers.flush()
    assert len(_files(tmp_path)) >= 3 * 15 and not list(tmp_path.glob("*/??/.*.tmp"))
    # a new engine (a restart): every document from disk, none prefilled again
    again = _llm(ckpt, prefix_cache_dir=tmp_path)
    assert _run(again, FIRST + FOLLOW, want) == [60] * 6
    assert _stats(again).hit_tokens["disk"] == 3 * 60 and _stats(again).corrupt_files == 0


def test_cached_tokens_count_every_tier(ckpt, want):
    """A prompt whose head is still on the GPU and whose tail is only in host memory."""
    llm = _llm(ckpt, cpu_offload_gb=1e-3, **_small_gpu())
    _run(llm, FIRST[:1], want)
    other = _ids(52, 7)  # 15 blocks with its output: evicts the first document's last blocks only
    want[tuple(other)] = _llm(ckpt).generate([other], GREEDY)[0].outputs[0].token_ids
    _run(llm, [other], want)
    before = dict(_stats(llm).hit_tokens)
    assert _run(llm, FOLLOW[:1], want) == [60]
    gained = {t: _stats(llm).hit_tokens[t] - before[t] for t in before}
    assert gained["gpu"] > 0 and gained["host"] > 0 and gained["gpu"] + gained["host"] == 60


def test_a_cache_made_under_other_settings_is_not_used(ckpt, want, tmp_path, caplog):
    made = _llm(ckpt, prefix_cache_dir=tmp_path)
    _run(made, FIRST[:1], want)
    made.engine.kv.tiers.flush()
    prompt = FOLLOW[0]
    others = {
        "block_size": dict(block_size=2),
        "kv_cache_dtype": dict(kv_cache_dtype="fp8"),
        "dtype": dict(dtype="bfloat16"),
        "dca": dict(dca=DCAConfig(chunk_size=16, local_size=4, original_max_position_embeddings=32)),
        "model": dict(model=save_tiny_checkpoint(tmp_path.parent / "other_model", seed=33,
                                                 extra_config={"dual_chunk_attention_config": DCA})),
    }
    for what, kw in others.items():
        caplog.clear()
        folder = kw.pop("model", ckpt)
        with caplog.at_level(logging.INFO, logger="qwen1m.cache.disk_tier"):
            llm = _llm(folder, prefix_cache_dir=tmp_path, **kw)
            assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 0, what
        assert any("made under other settings" in r.message and what in r.message for r in caplog.records), what
    assert _llm(ckpt, prefix_cache_dir=tmp_path).generate([prompt], GREEDY)[0].num_cached_tokens == 60


@pytest.mark.parametrize("damage", ["bit_flip", "truncated", "bad_header", "missing"])
def test_a_damaged_file_is_detected_deleted_and_recomputed(ckpt, want, tmp_path, damage):
    made = _llm(ckpt, prefix_cache_dir=tmp_path)
    _run(made, FIRST[:1], want)
    made.engine.kv.tiers.flush()
    path = _block_file(made, FOLLOW[0], 6)
    raw = path.read_bytes()
    if damage == "bit_flip":
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0x10]) + raw[-4:])
    elif damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "bad_header":
        path.write_bytes(raw[:20] + b"#" + raw[21:])
    else:
        path.unlink()
    llm = _llm(ckpt, prefix_cache_dir=tmp_path)
    assert _run(llm, FOLLOW[:1], want) == [24]  # the six blocks before the damaged one
    assert _stats(llm).corrupt_files == (0 if damage == "missing" else 1)
    llm.engine.kv.tiers.flush()  # the recomputed blocks are written again
    assert path.is_file() and path.read_bytes() == raw
    assert _run(_llm(ckpt, prefix_cache_dir=tmp_path), FOLLOW[:1], want) == [60]


def test_an_unwritable_folder_or_a_full_disk_warns_once(ckpt, want, tmp_path, caplog, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="qwen1m.cache"):
        llm = _llm(ckpt, prefix_cache_dir=blocker / "cache")  # cannot be created (as root, too)
        assert _run(llm, FIRST[:1] + FOLLOW[:1], want) == [0, 60]  # the host tier still serves
    assert [r.message for r in caplog.records if "without the disk tier" in r.message] != []
    assert len(caplog.records) == 1
    caplog.clear()

    import qwen1m.cache.disk_tier as disk_tier

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    llm = _llm(ckpt, prefix_cache_dir=tmp_path / "full", **_small_gpu())
    monkeypatch.setattr(disk_tier.os, "replace", full)  # the disk fills up after the start
    with caplog.at_level(logging.WARNING, logger="qwen1m.cache"):
        _run(llm, FIRST, want)
        llm.engine.kv.tiers.flush()
        assert _run(llm, FOLLOW, want) == [60, 60, 60]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].message
    assert not llm.engine.kv.tiers.disk.enabled and not list((tmp_path / "full").rglob("*.tmp"))


_WRITER = textwrap.dedent("""
    import json, sys
    from qwen1m import LLM, SamplingParams
    ckpt, folder, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(ckpt, device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=48,
              prefix_cache_dir=folder, prefix_cache_max_gb=float(sys.argv[4]) or None)
    for p in prompts:
        llm.generate([p], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
""")  # the queued writes finish at exit


@pytest.mark.parametrize("cap_blocks", [0, pytest.param(40, marks=pytest.mark.slow)], ids=["uncapped", "capped"])
def test_two_processes_share_one_folder(ckpt, want, tmp_path, cap_blocks):
    import json

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    cap = cap_blocks * (BLOCK_BYTES + 400) / 2**30  # a file: its block and a header of < 400 bytes
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(ckpt), str(tmp_path), json.dumps(order), str(cap)],
                              env=env) for order in (FIRST + FOLLOW, FOLLOW[::-1] + FIRST[::-1])]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert not list(tmp_path.rglob("*.tmp"))
    reader = _llm(ckpt, prefix_cache_dir=tmp_path)
    cached = _run(reader, FOLLOW, want)
    assert _stats(reader).corrupt_files == 0
    if cap_blocks:
        assert sum(f.stat().st_size for f in _files(tmp_path)) <= cap * 2**30 + 3 * 16 * (BLOCK_BYTES + 400)
    else:
        assert cached == [60, 60, 60]


def test_the_size_cap_keeps_the_recently_read_files(ckpt, want, tmp_path):
    cap = 36 * (BLOCK_BYTES + 400)  # two documents' files, not three
    llm = _llm(ckpt, prefix_cache_dir=tmp_path, prefix_cache_max_gb=cap / 2**30, cpu_offload_gb=1e-3,
               **_small_gpu())
    for p in FIRST:
        _run(llm, [p], want)
        llm.engine.kv.tiers.flush()
    assert sum(f.stat().st_size for f in _files(tmp_path)) <= cap
    fresh = _llm(ckpt, prefix_cache_dir=tmp_path)
    assert _run(fresh, FOLLOW[2:], want) == [60]  # the newest document survived the cap
    assert _run(fresh, FOLLOW[:1], want)[0] < 60  # the oldest went first


# ---- tensor parallelism (TP=2 over gloo): each rank keeps its own shard's host slots and files ----
RANK_BLOCK_BYTES = BLOCK_BYTES // 2  # one KV head of two per rank


def _tp2(ckpt, **kw) -> LLM:
    return _llm(ckpt, tensor_parallel_size=2, **kw)


def _small_gpu_tp2() -> dict:
    """28 GPU blocks per rank, as ``_small_gpu`` (kv_cache_memory is per rank)."""
    return {"kv_cache_memory": 112 * PER_TOKEN // 2, "max_model_len": 110}


@pytest.fixture(scope="module")
def want_tp2(ckpt):
    """TP=2 without any cache (TP=2 need not match TP=1 bit for bit)."""
    plain = _tp2(ckpt)
    try:
        return {tuple(p): plain.generate([p], GREEDY)[0].outputs[0].token_ids for p in FIRST + FOLLOW}
    finally:
        plain.shutdown()


def _rank_folders(root: Path) -> dict[int, Path]:
    """rank -> its identity folder, from the manifests."""
    import json

    return {json.loads(m.read_text())["tensor_parallel_rank"]: m.parent for m in root.glob("*/manifest.json")}


def _rank_file(llm: LLM, rank: int, key: bytes) -> Path:
    from qwen1m.cache.cache_identity import identity

    settings = {**llm.engine.kv.tiers.disk.settings, "tensor_parallel_rank": rank}
    return llm.engine.kv.tiers.disk.root / identity(settings) / key.hex()[:2] / f"{key.hex()}.kv"


def test_tp2_gpu_evictions_go_to_host_memory(ckpt, want_tp2):
    llm = _tp2(ckpt, cpu_offload_gb=1e-3, **_small_gpu_tp2())
    try:
        assert llm.engine.kv.tiers.peers is not None
        assert _run(llm, FIRST, want_tp2) == [0, 0, 0]
        assert _run(llm, FOLLOW, want_tp2) == [60, 60, 60]  # the first two documents from host memory
        stats = _stats(llm)
        assert stats.hit_tokens["host"] >= 120 and stats.hit_tokens["disk"] == 0
        assert stats.read_bytes["host"] == stats.hit_tokens["host"] // 4 * RANK_BLOCK_BYTES  # rank 0's shard
    finally:
        llm.shutdown()


def test_tp2_host_evictions_go_to_disk_and_a_restart_reads_them(ckpt, want_tp2, tmp_path):
    host_blocks = 20  # per rank, fewer than two documents' 16 blocks each
    llm = _tp2(ckpt, cpu_offload_gb=host_blocks * RANK_BLOCK_BYTES / 2**30, prefix_cache_dir=tmp_path,
               **_small_gpu_tp2())
    try:
        assert llm.engine.kv.tiers.host.pool.num_blocks == host_blocks
        assert _run(llm, FIRST, want_tp2) == [0, 0, 0]
        llm.engine.kv.tiers.flush()
        assert _run(llm, FOLLOW, want_tp2) == [60, 60, 60]
        assert _stats(llm).hit_tokens["disk"] >= 60
        key = PrefixCache(4).keys(FIRST[0], 1)[0]
        shards = [_rank_file(llm, rank, key) for rank in (0, 1)]
    finally:
        llm.shutdown()  # the workers write what is queued before they leave
    folders = _rank_folders(tmp_path)
    assert sorted(folders) == [0, 1] and all(len(_files(f.parent)) >= 3 * 15 for f in folders.values())
    assert shards[0].read_bytes() != shards[1].read_bytes()  # each rank wrote its own KV head
    again = _tp2(ckpt, prefix_cache_dir=tmp_path)  # a restart: every document from both ranks' files
    try:
        assert _run(again, FIRST + FOLLOW, want_tp2) == [60] * 6
        assert _stats(again).hit_tokens["disk"] == 3 * 60 and _stats(again).corrupt_files == 0
    finally:
        again.shutdown()


@pytest.mark.parametrize("damage", ["bit_flip", "missing"])
def test_tp2_a_damaged_file_of_rank_1_only_is_recomputed_on_every_rank(ckpt, want_tp2, tmp_path, damage):
    made = _tp2(ckpt, prefix_cache_dir=tmp_path)
    try:
        _run(made, FIRST[:1], want_tp2)
        made.engine.kv.tiers.flush()
        key = PrefixCache(4).keys(FOLLOW[0], 7)[6]
        ours, theirs = _rank_file(made, 0, key), _rank_file(made, 1, key)
    finally:
        made.shutdown()
    raw0, raw1 = ours.read_bytes(), theirs.read_bytes()
    if damage == "bit_flip":
        theirs.write_bytes(raw1[:-5] + bytes([raw1[-5] ^ 0x10]) + raw1[-4:])
    else:
        theirs.unlink()
    llm = _tp2(ckpt, prefix_cache_dir=tmp_path)
    try:
        assert _run(llm, FOLLOW[:1], want_tp2) == [24]  # rank 0's sound file is not used either
        assert _stats(llm).corrupt_files == (1 if damage == "bit_flip" else 0)
        llm.engine.kv.tiers.flush()  # the recomputed block is written again, on both ranks
        assert theirs.read_bytes() == raw1 and ours.read_bytes() == raw0
        assert _stats(llm).hit_tokens["disk"] == 24
    finally:
        llm.shutdown()


_TORCHRUN = textwrap.dedent("""
    import json, sys
    from qwen1m import LLM, SamplingParams
    ckpt, folder, prompts, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    llm = LLM(ckpt, device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=48,
              tensor_parallel_size=2, prefix_cache_dir=folder)
    rows = []
    for p in prompts:
        o = llm.generate([p], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
        rows.append([o.outputs[0].token_ids, o.num_cached_tokens])
    stats = llm.engine.kv.stats()
    json.dump({"rows": rows, "disk": stats.hit_tokens["disk"]}, open(out, "w"))
    llm.shutdown()
    print(sys.argv[5], flush=True)
""")  # under torchrun the code after LLM(...) is rank 0's: rank 1 serves its steps inside LLM(...)


def _torchrun(ckpt, folder_for, prompts, out: Path) -> tuple[dict, Path]:
    """Two ranks under torchrun; ``folder_for(attempt)``: the cache folder of each attempt (a launch is
    repeated once after the known teardown abort, see tests/torchrun.py). Returns its JSON and folder."""
    import json

    from torchrun import DONE, run_torchrun

    script = out.parent / "tiers_torchrun.py"
    script.write_text(_TORCHRUN)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    attempt = run_torchrun(script, lambda a: [ckpt, folder_for(a), json.dumps(prompts), out, DONE], env=env)
    return json.loads(out.read_text()), folder_for(attempt)


def test_torchrun_tp2_writes_both_ranks_files_and_a_new_launch_reads_them(ckpt, want_tp2, tmp_path):
    """The tiers under a torchrun launch (ranks started by torchrun, not spawned by LLM): the first
    launch writes each rank's shard files; a second launch (a restart) answers follow-ups from disk
    with the tokens of a TP=2 engine without any cache."""
    first, folder = _torchrun(ckpt, lambda attempt: tmp_path / f"cache{attempt}", FIRST, tmp_path / "first.json")
    assert [row[0] for row in first["rows"]] == [want_tp2[tuple(p)] for p in FIRST]
    assert [row[1] for row in first["rows"]] == [0, 0, 0] and first["disk"] == 0
    folders = _rank_folders(folder)
    assert sorted(folders) == [0, 1] and all(len(_files(f.parent)) >= 3 * 15 for f in folders.values())
    again, _ = _torchrun(ckpt, lambda attempt: folder, FOLLOW, tmp_path / "again.json")
    assert [row[0] for row in again["rows"]] == [want_tp2[tuple(p)] for p in FOLLOW]
    assert [row[1] for row in again["rows"]] == [60, 60, 60]  # every document from both ranks' files
    assert again["disk"] == 3 * 60


def test_a_document_larger_than_the_host_tier_streams_through_it(ckpt, want, tmp_path, monkeypatch):
    import qwen1m.cache.kv_tiers as kv_tiers

    made = _llm(ckpt, prefix_cache_dir=tmp_path)
    _run(made, FIRST[:1], want)
    made.engine.kv.tiers.flush()
    monkeypatch.setattr(kv_tiers, "STAGING_BYTES", 3 * BLOCK_BYTES)  # copies up in batches of 3 blocks
    small = _llm(ckpt, prefix_cache_dir=tmp_path, cpu_offload_gb=5 * BLOCK_BYTES / 2**30)  # 5 host slots
    assert _run(small, FOLLOW[:1], want) == [60] and _stats(small).hit_tokens["disk"] == 60
