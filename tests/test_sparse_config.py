"""sparse_attention_config.json parsing: the Qwen/MInference format, errors naming layer/head/field."""

from __future__ import annotations

import json

import pytest

from qwen1m.errors import ConfigError
from qwen1m.sparse_config import SparseConfig, load_sparse_config


def _write(tmp_path, data):
    path = tmp_path / "sparse_attention_config.json"
    path.write_text(json.dumps(data))
    return path


def test_round_trip_and_vllm_remap(tmp_path):
    data = [{"0": ["vertical_and_slash", 1000, 6096, 0.93], "1": ["vertical_and_slash", 30, 800, 0.997]},
            {"1": ["vertical_and_slash", 3048, 8144, 0.85], "0": ["vertical_and_slash", 0, 64, 1.0]}]
    cfg = load_sparse_config(_write(tmp_path, data), num_layers=2, num_heads=2)
    assert cfg.vertical_sizes == ((1000, 30), (0, 3048)) and cfg.slash_sizes == ((6096, 800), (64, 8144))
    assert cfg.budgets(0) == ([1000, 130], [6096, 800])  # vertical 30 -> 130 as vLLM does
    assert cfg.scores[1] == (1.0, 0.85)
    again = load_sparse_config(_write(tmp_path, cfg.to_json()), 2, 2)
    assert again == cfg
    assert cfg.threshold == 32768 and cfg.last_q == 64 and cfg.sink_tokens == 30 and cfg.local_diagonals == 100


@pytest.mark.parametrize("data,message", [
    ({"0": []}, "must hold a JSON list with one entry per layer"),
    ([{"0": ["vertical_and_slash", 1, 1, 1.0], "1": ["vertical_and_slash", 1, 1, 1.0]}],
     "has 1 layer entries but the model has 2 layers"),
    ([{"0": ["vertical_and_slash", 1, 1, 1.0]}, {"0": ["vertical_and_slash", 1, 1, 1.0]}],
     "layer 0 has no entry for head 1"),
    ([{"0": ["vertical_and_slash", 1, 1, 1.0], "7": ["vertical_and_slash", 1, 1, 1.0]}, {}],
     "layer 0 has head key '7'"),
    ([{"0": ["block_sparse", 1, 1, 1.0], "1": ["vertical_and_slash", 1, 1, 1.0]}, {}],
     "layer 0 head 0 has pattern 'block_sparse'"),
    ([{"0": ["vertical_and_slash", -5, 1, 1.0], "1": ["vertical_and_slash", 1, 1, 1.0]}, {}],
     "layer 0 head 0 field vertical_size must be a non-negative integer"),
    ([{"0": ["vertical_and_slash", 1, 1, 1.0], "1": ["vertical_and_slash", 1, "x", 1.0]}, {}],
     "layer 0 head 1 field slash_size"),
])
def test_errors_name_the_layer_head_and_field(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_sparse_config(_write(tmp_path, data), num_layers=2, num_heads=2)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sparse_config(tmp_path / "nope.json", 1, 1)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_sparse_config(bad, 1, 1)
    with pytest.raises(ConfigError, match="'last_q' must be positive"):
        SparseConfig.uniform(1, 1, 10, 10, last_q=0)
