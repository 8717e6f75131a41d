"""EngineConfig: the one list of engine options, reachable from every model-loading CLI command and
exactly the keywords of LLM(...), validated once with a sentence naming the field."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from qwen1m.cli import build_parser
from qwen1m.config import DCAConfig
from qwen1m.engine_config import EngineConfig
from qwen1m.errors import ConfigError

# field -> (flags, the value EngineConfig.from_cli_args must give for them); each value differs from
# the field's default, so a flag that reached no field (or the wrong one) fails
CLI_CASES = {
    "model": (["--model", "some/folder"], "some/folder"),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "device": (["--device", "cuda:1"], "cuda:1"),
    "load_format": (["--load-format", "dummy"], "dummy"),
    "dca": (["--dca-chunk-size", "64", "--dca-local-size", "4", "--dca-original-max-position-embeddings", "32"],
            DCAConfig(chunk_size=64, local_size=4, original_max_position_embeddings=32)),
    "max_model_len": (["--max-model-len", "1000"], 1000),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "512"], 512),
    "max_num_seqs": (["--max-num-seqs", "3"], 3),
    "kv_cache_dtype": (["--kv-cache-dtype", "fp8"], "fp8"),
    "attention_dtype": (["--attention-dtype", "fp8"], "fp8"),
    "block_size": (["--block-size", "16"], 16),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "kv_cache_memory": (["--kv-cache-memory", "1048576"], 1048576),
    "sparse_attention_config": (["--sparse-config", "none"], None),
    "sparse_threshold": (["--sparse-threshold", "100"], 100),
    "sparse_dense_above": (["--sparse-dense-above", "0.25"], 0.25),
    "sparse_telemetry": (["--sparse-telemetry"], True),
    "tensor_parallel_size": (["--tensor-parallel-size", "2"], 2),
    "enforce_eager": (["--enforce-eager"], True),
    "enable_prefix_caching": (["--enable-prefix-caching"], True),
    "seed": (["--engine-seed", "5"], 5),
    "cpu_offload_gb": (["--cpu-offload-gb", "1.5"], 1.5),
    "prefix_cache_dir": (["--prefix-cache-dir", "kv"], "kv"),
    "prefix_cache_max_gb": (["--prefix-cache-dir", "kv", "--prefix-cache-max-gb", "2"], 2.0),
}
# flags a command requires besides the model's
REQUIRED = {"qwen1m generate": ["--prompt", "x"], "qwen1m calibrate": ["--length", "8"]}
# fields a command sets from its own flag instead (eval: --batch-size is max_num_seqs)
EXCLUDED = {"qwen1m eval passkey": {"max_num_seqs"}, "qwen1m eval ruler": {"max_num_seqs"}}
MODEL_COMMANDS = {"qwen1m generate", "qwen1m calibrate", "qwen1m demo", "qwen1m serve", "qwen1m eval passkey",
                  "qwen1m eval ruler"}


def _model_parsers(parser: argparse.ArgumentParser):
    """Every (sub)command parser that has the model flags."""
    if any("--model" in action.option_strings for action in parser._actions):
        yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _model_parsers(sub)


def test_the_table_covers_every_field():
    assert set(CLI_CASES) == {f.name for f in fields(EngineConfig)}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_every_field_is_reachable_from_every_model_command(name):
    parsers = {p.prog: p for p in _model_parsers(build_parser())}
    assert set(parsers) == MODEL_COMMANDS
    argv, want = CLI_CASES[name]
    default = next(f.default for f in fields(EngineConfig) if f.name == name)
    assert want != default
    for prog, parser in parsers.items():
        if name in EXCLUDED.get(prog, ()):
            assert not any(a.dest == name for a in parser._actions), f"{prog} has a flag for excluded {name}"
            continue
        args = parser.parse_args(REQUIRED.get(prog, []) + argv)
        overrides = {f: 7 for f in EXCLUDED.get(prog, ())}
        assert getattr(EngineConfig.from_cli_args(args, **overrides), name) == want, f"{prog} {argv}"


def test_cli_defaults_are_the_engine_config_defaults():
    """Nothing restates a default: unset flags give EngineConfig() itself."""
    for parser in _model_parsers(build_parser()):
        args = parser.parse_args(REQUIRED.get(parser.prog, []))
        overrides = {f: EngineConfig().max_num_seqs for f in EXCLUDED.get(parser.prog, ())}
        assert EngineConfig.from_cli_args(args, **overrides) == EngineConfig(), parser.prog


def test_eval_batch_size_defaults_to_max_num_seqs():
    args = build_parser().parse_args(["eval", "passkey"])
    assert args.batch_size == EngineConfig().max_num_seqs


def test_dca_flags():
    parser = next(p for p in _model_parsers(build_parser()) if p.prog == "qwen1m demo")
    dca = EngineConfig.from_cli_args(parser.parse_args(["--dca-chunk-size", "64"])).dca
    assert dca == DCAConfig(chunk_size=64, local_size=2, original_max_position_embeddings=64)
    assert EngineConfig.from_cli_args(parser.parse_args(["--no-dca", "--dca-chunk-size", "64"])).dca is None
    with pytest.raises(ConfigError, match="need --dca-chunk-size"):
        EngineConfig.from_cli_args(parser.parse_args(["--dca-local-size", "4"]))


@pytest.mark.parametrize("options, message", [
    (dict(max_model_len=1), "max_model_len must be at least 2, got 1."),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be at least 1, got 0."),
    (dict(max_num_seqs=0), "max_num_seqs must be at least 1, got 0."),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be at least 1, got 0."),
    (dict(block_size=0), "block_size must be positive, got 0."),
    (dict(kv_cache_dtype="fp16"), "kv_cache_dtype must be one of 'auto', 'fp8', got 'fp16'."),
    (dict(load_format="pt"), "load_format must be one of 'auto', 'safetensors', 'dummy', got 'pt'."),
    (dict(dca=True), "dca must be 'auto', None/False or a DCAConfig, got True."),
    (dict(dca="on"), "dca must be 'auto', None/False or a DCAConfig, got 'on'."),
    (dict(sparse_attention_config=True), "sparse_attention_config must be 'auto', a path, a SparseConfig or "
                                         "None/False, got True."),
    (dict(cpu_offload_gb=-1), "cpu_offload_gb must be >= 0, got -1."),
    (dict(prefix_cache_max_gb=2.0), "prefix_cache_max_gb needs prefix_cache_dir."),
    (dict(prefix_cache_dir="kv", prefix_cache_max_gb=0.0), "prefix_cache_max_gb must be positive, got 0.0."),
    (dict(max_num_seqs="8"), "max_num_seqs must be int, got '8' (str)."),
    (dict(max_num_seqs=True), "max_num_seqs must be int, got True (bool)."),
    (dict(max_model_len=1.5), "max_model_len must be int or None, got 1.5 (float)."),
    (dict(model=3), "model must be str, Path or None, got 3 (int)."),
    (dict(enforce_eager=1), "enforce_eager must be bool, got 1 (int)."),
])
def test_bad_options_are_one_sentence_naming_the_field(options, message):
    with pytest.raises(ConfigError) as error:
        EngineConfig(**options)
    assert str(error.value) == message


def test_torch_values_and_ints_for_floats_are_taken():
    config = EngineConfig(dtype=torch.bfloat16, device=torch.device("cuda", 1), gpu_memory_utilization=1,
                          prefix_cache_dir=Path("kv"))
    assert (config.dtype, config.device, config.gpu_memory_utilization) == ("bfloat16", "cuda:1", 1)
    assert config.replace(max_num_seqs=3).max_num_seqs == 3
    with pytest.raises(ConfigError, match="max_num_seqs must be at least 1"):
        config.replace(max_num_seqs=0)  # a copy is validated again


def test_llm_keywords_are_exactly_the_engine_config_fields():
    """Each field is a keyword LLM passes to EngineConfig before loading anything (a bad value is
    EngineConfig's ConfigError naming it); any other keyword is a TypeError, as before EngineConfig."""
    from qwen1m import LLM

    for f in fields(EngineConfig):
        with pytest.raises(ConfigError) as error:
            LLM(**{f.name: object()})
        assert str(error.value).startswith(f"{f.name} must be"), f.name
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_batch'"):
        LLM(max_batch=4)
    with pytest.raises(ConfigError, match="max_num_seqs must be at least 1"):
        LLM("by/position", max_num_seqs=0)  # model by position, as before


def test_llm_keeps_its_engine_config(tiny_checkpoint):
    from qwen1m import LLM

    config = EngineConfig(model=str(tiny_checkpoint), dtype=torch.float32, device="cpu", max_model_len=128,
                          max_num_batched_tokens=32, max_num_seqs=3, block_size=8, kv_cache_memory=1 << 20,
                          sparse_attention_config=None, seed=3)
    llm = LLM(**config.options())
    assert llm.engine_config == config
    assert (llm.engine.max_num_batched_tokens, llm.engine.max_model_len) == (32, 128)
    assert llm.dtype == torch.float32 and llm.model_path == Path(tiny_checkpoint)
