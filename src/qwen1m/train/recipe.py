"""The recipe file: a JSON document listing the model, the data and the stages of progressive
context extension (design §5.2). Parsed once into frozen dataclasses; errors name the field.

    {"name": "...", "seed": 0,
     "model": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8,
               "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true},
     "tokenizer": {"vocab_size": 4096} | {"path": "folder or tokenizer.json"},
     "corpus": {"num_grammar": 20000, "stdlib": true, "text_files": []},
     "optimizer": {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0},
     "dca": true,
     "init_from": "folder"   (optional: continue training a checkpoint; its tokenizer is used)
     "stages": [{"name": "s1", "seq_len": 512, "rope_theta": 1e4, "steps": 300 | "time_s": 60,
                 "lr": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.1, "batch_size": 64,
                 "short_fraction": 0.0, "mix": {"passkey": 1, "lm": 1}}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen1m.errors import ConfigError
from qwen1m.train.tasks import TASKS


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    seq_len: int
    rope_theta: float
    lr: float
    batch_size: int
    mix: dict[str, float]
    steps: int | None = None  # fixed step count, or
    time_s: float | None = None  # a wall-time budget resolved to steps by timing the first steps
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    short_fraction: float = 0.0  # rows packed from shorter samples (Qwen2.5-1M: 0.25 in later stages)

    def __post_init__(self) -> None:
        where = f"recipe stage '{self.name}'"
        if (self.steps is None) == (self.time_s is None):
            raise ConfigError(f"{where} needs exactly one of 'steps' or 'time_s'.")
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where} field '{key}' must be positive, got {getattr(self, key)}.")
        if not 0.0 <= self.short_fraction <= 1.0:
            raise ConfigError(f"{where} field 'short_fraction' must be in [0, 1], got {self.short_fraction}.")
        unknown = sorted(set(self.mix) - set(TASKS))
        if unknown or not any(v > 0 for v in self.mix.values()):
            raise ConfigError(f"{where} field 'mix' has unknown tasks {unknown} or no positive weight "
                              f"(known tasks: {', '.join(TASKS)}).")


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    model: dict[str, Any]
    stages: tuple[Stage, ...]
    seed: int = 0
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"vocab_size": 4096})
    corpus: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    dca: bool = True  # write dual_chunk_attention_config into the final checkpoint
    gradient_checkpointing: bool = False
    num_workers: int = 0  # DataLoader workers building batches (0: in the training process)
    log_every: int = 10
    save_every: int = 0  # resumable state every n steps (0: at stage ends only)
    # A Hugging Face folder whose weights start the first stage (continued training, design §5.2's later
    # stages start from the previous stage's model); its tokenizer.json replaces tokenizer training.
    init_from: str | None = None
    source: dict[str, Any] = field(default_factory=dict)  # the JSON as read, for the log

    def to_json(self) -> dict[str, Any]:
        out = dict(self.source)
        out["stages"] = [
            {**src, "steps": st.steps} for src, st in zip(self.source.get("stages", []), self.stages)
        ]
        return out


_STAGE_KEYS = set(Stage.__slots__)
_RECIPE_KEYS = set(Recipe.__slots__) - {"source"}


def parse_recipe(d: dict[str, Any], where: str = "recipe", base: Path | None = None) -> Recipe:
    """``base``: the folder that a relative ``init_from`` is resolved against (the recipe file's)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object.")
    unknown = sorted(set(d) - _RECIPE_KEYS - {"comment"})
    if unknown:
        raise ConfigError(f"{where} has unknown fields {unknown} (expected {sorted(_RECIPE_KEYS)}).")
    if not d.get("stages"):
        raise ConfigError(f"{where} has no 'stages'.")
    stages = []
    for i, s in enumerate(d["stages"]):
        bad = sorted(set(s) - _STAGE_KEYS - {"comment"})
        if bad:
            raise ConfigError(f"{where} stage {i} has unknown fields {bad} (expected {sorted(_STAGE_KEYS)}).")
        s = {k: v for k, v in s.items() if k != "comment"}
        s.setdefault("name", f"stage{i + 1}")
        try:
            stages.append(Stage(**s))
        except TypeError as e:
            raise ConfigError(f"{where} stage {i}: {e}.") from None
    for key in ("model",):
        if key not in d:
            raise ConfigError(f"{where} is missing the field '{key}'.")
    kwargs = {k: v for k, v in d.items() if k in _RECIPE_KEYS and k != "stages"}
    if kwargs.get("init_from") is not None:
        init = Path(kwargs["init_from"])
        if base is not None and not init.is_absolute():
            init = base / init
        if not (init / "model.safetensors").is_file() or not (init / "tokenizer.json").is_file():
            raise ConfigError(f"{where} field 'init_from': '{init}' is not a checkpoint folder with "
                              "model.safetensors and tokenizer.json.")
        kwargs["init_from"] = str(init)
        kwargs["tokenizer"] = {"path": str(init)}
    return Recipe(stages=tuple(stages), source=d, **kwargs)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file '{path}' does not exist.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"recipe file '{path}' is not valid JSON: {e}.") from None
    return parse_recipe(d, f"recipe '{path}'", base=path.parent)
