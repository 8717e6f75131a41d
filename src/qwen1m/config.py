"""Model configuration, read once from a checkpoint folder's ``config.json``.

The dataclasses here are the one config contract of the package (design §1.2): everything
downstream receives them explicitly; nothing re-reads JSON. Field names follow Hugging Face so the
mapping stays obvious; values are validated in ``__post_init__`` with errors that name the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen1m.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPE_TO_ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True, slots=True)
class DCAConfig:
    """Dual Chunk Attention settings (design §1.2 and §2.2); notation c, w, s of design §2.1."""

    chunk_size: int  # c: the largest relative position DCA ever produces (= pre-training length)
    local_size: int  # w: window in the successive chunk where positions stay exact
    # Training length for the YaRN attention temperature m = max(1, 0.1 ln(L / L0) + 1); 0 disables it
    # (design §2.5; vLLM's default is 0 when the key is absent).
    original_max_position_embeddings: int = 0
    # Runtime keys vLLM also reads from this object (design §1.2); None: the sparse config's defaults.
    sparse_attention_threshold: int | None = None
    sparse_attention_last_q: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ConfigError(f"dual_chunk_attention_config.chunk_size must be positive, got {self.chunk_size}.")
        if not 0 < self.local_size < self.chunk_size:
            raise ConfigError(
                f"dual_chunk_attention_config.local_size must be in (0, chunk_size={self.chunk_size}), "
                f"got {self.local_size}."
            )
        if self.original_max_position_embeddings < 0:
            raise ConfigError(
                "dual_chunk_attention_config.original_max_position_embeddings must be >= 0, "
                f"got {self.original_max_position_embeddings}."
            )

    @property
    def chunk_len(self) -> int:
        """s = c - w: the stride of DCA chunks in the token sequence."""
        return self.chunk_size - self.local_size

    def yarn_scale(self, length: int) -> float:
        """m(L) = max(1, 0.1 ln(L / L0) + 1); logits are scaled by m^2 (q and k each by m)."""
        if self.original_max_position_embeddings <= 0 or length <= 0:
            return 1.0
        return max(1.0, 0.1 * math.log(length / self.original_max_position_embeddings) + 1.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "dual_chunk_attention_config") -> DCAConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be an object, got {type(d).__name__}.")
        for key in ("chunk_size", "local_size"):
            if key not in d:
                raise ConfigError(f"{where} is missing the field '{key}'.")
        return cls(
            chunk_size=_int(d, "chunk_size", where),
            local_size=_int(d, "local_size", where),
            original_max_position_embeddings=_int(d, "original_max_position_embeddings", where, default=0),
            sparse_attention_threshold=_opt_int(d, "sparse_attention_threshold", where),
            sparse_attention_last_q=_opt_int(d, "sparse_attention_last_q", where),
        )


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Static RoPE scaling as transformers applies it (``rope_scaling`` / ``rope_parameters``)."""

    rope_type: str  # "linear" or "yarn" ("default" is represented by None)
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0  # YaRN defaults (transformers' _compute_yarn_parameters)
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "yarn"):
            raise ConfigError(
                f"config.json rope_scaling.rope_type '{self.rope_type}' is not supported "
                "(expected linear or yarn, or no rope_scaling)."
            )
        if self.factor <= 0:
            raise ConfigError(f"config.json rope_scaling.factor must be positive, got {self.factor}.")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture of a Qwen2 / Qwen3 dense causal LM."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2 has q/k/v biases; Qwen3 does not
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    rope_scaling: RopeScaling | None = None
    dca: DCAConfig | None = None
    torch_dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"config.json architecture '{self.architecture}' is not supported "
                f"(expected one of {', '.join(SUPPORTED_ARCHITECTURES)})."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json field '{name}' must be positive, got {getattr(self, name)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json head_dim must be even for RoPE, got {self.head_dim}.")
        # eps <= 0 divides by zero in RMSNorm on a zero row (the model then emits token 0 only)
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"config.json field '{name}' must be a positive number, got {value}.")
        bad = next((t for t in self.eos_token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0), None)
        if bad is not None:
            raise ConfigError(f"config.json eos_token_id must be non-negative integers, got {bad!r}.")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> ModelConfig:
        archs = d.get("architectures")
        if archs:
            if not isinstance(archs, list) or not archs:
                raise ConfigError(f"{where} field 'architectures' must be a non-empty list, got {archs!r}.")
            arch = archs[0]
        elif d.get("model_type") in _MODEL_TYPE_TO_ARCH:
            arch = _MODEL_TYPE_TO_ARCH[d["model_type"]]
        else:
            raise ConfigError(
                f"{where} has neither 'architectures' nor a known 'model_type' "
                f"(expected one of {', '.join(SUPPORTED_ARCHITECTURES)})."
            )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{where} architecture '{arch}' is not supported "
                f"(expected one of {', '.join(SUPPORTED_ARCHITECTURES)})."
            )
        is_qwen3 = arch == "Qwen3ForCausalLM"
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"{where} is missing the field '{key}'.")
        num_heads = _int(d, "num_attention_heads", where)
        hidden = _int(d, "hidden_size", where)
        head_dim = d.get("head_dim")
        if num_heads <= 0:
            raise ConfigError(f"{where} field 'num_attention_heads' must be positive, got {num_heads}.")
        if head_dim is None:
            if hidden % num_heads:
                raise ConfigError(
                    f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={num_heads} "
                    "and no head_dim is given."
                )
            head_dim = hidden // num_heads
        rope_params = d.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise ConfigError(f"{where} field 'rope_parameters' must be an object.")
        rope_theta = _float(d if "rope_theta" in d else rope_params, "rope_theta", where, 10000.0)
        scaling_dict = d.get("rope_scaling") or (
            rope_params if rope_params.get("rope_type", "default") != "default" else None
        )
        rope_scaling = _parse_rope_scaling(scaling_dict, where) if scaling_dict else None
        dca_dict = d.get("dual_chunk_attention_config")
        dca = DCAConfig.from_dict(dca_dict, f"{where} dual_chunk_attention_config") if dca_dict else None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            architecture=arch,
            vocab_size=_int(d, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", where),
            num_hidden_layers=_int(d, "num_hidden_layers", where),
            num_attention_heads=num_heads,
            num_key_value_heads=_int(d, "num_key_value_heads", where, default=num_heads),
            head_dim=_int({"head_dim": head_dim}, "head_dim", where),
            max_position_embeddings=_int(d, "max_position_embeddings", where, default=32768),
            rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6),
            rope_theta=rope_theta,
            tie_word_embeddings=_bool(d, "tie_word_embeddings", where, False),
            attention_bias=_bool(d, "attention_bias", where, not is_qwen3),
            qk_norm=is_qwen3,
            rope_scaling=rope_scaling,
            dca=dca,
            torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16")) or "bfloat16"),
            eos_token_ids=eos_ids,
        )


def _int(d: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} field '{key}' must be an integer, got {value!r}.")
    return value


def _float(d: dict[str, Any], key: str, where: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} field '{key}' must be a number, got {value!r}.")
    return float(value)


def _bool(d: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):  # bool("false") is True: a string here would flip the meaning
        raise ConfigError(f"{where} field '{key}' must be true or false, got {value!r}.")
    return value


def _opt_int(d: dict[str, Any], key: str, where: str) -> int | None:
    return None if d.get(key) is None else _int(d, key, where)


def _parse_rope_scaling(d: Any, where: str) -> RopeScaling | None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} field 'rope_scaling' must be an object, got {type(d).__name__}.")
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type == "default":
        return None
    orig = d.get("original_max_position_embeddings")
    where = f"{where} rope_scaling"
    return RopeScaling(
        rope_type=str(rope_type),
        factor=_float(d, "factor", where, 1.0),
        original_max_position_embeddings=None if orig is None else _int(d, "original_max_position_embeddings", where),
        beta_fast=_float(d, "beta_fast", where, 32.0) if d.get("beta_fast") else 32.0,
        beta_slow=_float(d, "beta_slow", where, 1.0) if d.get("beta_slow") else 1.0,
        attention_factor=d.get("attention_factor"),
        mscale=d.get("mscale"),
        mscale_all_dim=d.get("mscale_all_dim"),
        truncate=bool(d.get("truncate", True)),
    )


def load_model_config(folder: str | Path) -> ModelConfig:
    """Read ``folder/config.json`` (plus EOS ids from ``generation_config.json``)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"Model folder '{folder}' does not exist or is not a directory.")
    if not path.is_file():
        raise ConfigError(f"Model folder '{folder}' has no config.json.")
    data = _read_json(path)
    cfg = ModelConfig.from_dict(data, where=str(path))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        eos = gen.get("eos_token_id")
        extra = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        merged = tuple(dict.fromkeys(cfg.eos_token_ids + extra))
        if merged != cfg.eos_token_ids:
            from dataclasses import replace

            cfg = replace(cfg, eos_token_ids=merged)
    return cfg


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}.") from None
    except OSError as e:
        raise ConfigError(f"{path} could not be read: {e.strerror}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data
