"""generation_config.json supplies the sampling defaults: read, validated, and used by LLM."""

from __future__ import annotations

import json

import pytest

from qwen1m import LLM, SamplingParams
from qwen1m.errors import ConfigError
from qwen1m.generation_config import load_generation_defaults


def _write(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(data))
    return folder


def test_qwen_1m_fields_map_to_sampling_params(tmp_path):
    folder = _write(tmp_path, {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                               "repetition_penalty": 1.05, "bos_token_id": 1, "max_new_tokens": 2048})
    assert load_generation_defaults(folder) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                "repetition_penalty": 1.05, "max_tokens": 2048}


def test_do_sample_false_means_greedy_whatever_the_temperature(tmp_path):
    assert load_generation_defaults(_write(tmp_path, {"do_sample": False, "temperature": 0.9})) == {
        "temperature": 0.0}


def test_absent_file_gives_no_defaults(tmp_path):
    assert load_generation_defaults(tmp_path) == {}


@pytest.mark.parametrize("data, words", [
    ({"top_p": 1.5}, "'top_p' is out of range: 1.5"),
    ({"top_k": 2.5}, "'top_k' must be an integer"),
    ({"temperature": "hot"}, "'temperature' must be a number"),
    ({"do_sample": "yes"}, "'do_sample' must be true or false"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_fields_name_the_file_and_field(tmp_path, data, words):
    folder = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_generation_defaults(folder)
    assert words in str(err.value) and "generation_config.json" in str(err.value)


def test_broken_json_names_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{temperature: 0.7")
    with pytest.raises(ConfigError, match="generation_config.json is not readable JSON"):
        load_generation_defaults(tmp_path)


def test_bundled_model_is_greedy_by_default_in_python():
    llm = LLM(max_model_len=256)
    assert llm.get_default_sampling_params().temperature == 0.0
    prompt = "The grass is green. The pass key is 41. What is the pass key?"
    default = llm.generate([prompt])[0].outputs[0].token_ids
    greedy = llm.generate([prompt], SamplingParams(temperature=0))[0].outputs[0].token_ids
    assert default == greedy


def test_llm_applies_the_checkpoints_defaults(tiny_checkpoint):
    _write(tiny_checkpoint, {"do_sample": True, "temperature": 0.5, "top_k": 7})
    params = LLM(tiny_checkpoint, max_model_len=64).get_default_sampling_params()
    assert (params.temperature, params.top_k, params.top_p) == (0.5, 7, 1.0)
