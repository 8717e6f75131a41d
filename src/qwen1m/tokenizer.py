"""Text <-> token ids and chat prompts, read from a Hugging Face checkpoint folder.

Only "fast" tokenizers are supported: ``tokenizer.json`` is loaded with the ``tokenizers`` library,
which is what transformers itself runs for Qwen. Everything else transformers layers on top
(special-token names, EOS ids, the Jinja chat template) is read here from the folder's JSON files
and reproduced without importing transformers (only tests use it).

The chat template is rendered the way transformers' ``apply_chat_template`` renders it (see
``transformers/utils/chat_template_utils.py``): an immutable Jinja sandbox with ``trim_blocks``,
``lstrip_blocks`` and loop controls, a ``tojson`` filter that keeps non-ASCII text, the globals
``raise_exception`` and ``strftime_now``, and the variables ``messages``, ``tools``, ``documents``,
``add_generation_prompt`` and the named special tokens (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import tokenizers

from qwen1m.chat_template import TemplateRaised, jinja_environment, plain, template_messages
from qwen1m.errors import CheckpointError, ConfigError, RequestError

# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_DEFAULT_TEMPLATE = "default"
_TOOL_USE_TEMPLATE = "tool_use"  # picked over "default" when tools are given, as transformers does


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special ids, and its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str],
        eos_token_ids: tuple[int, ...],
        pad_token_id: int | None,
        chat_templates: dict[str, str],
        folder: Path | None = None,
    ) -> None:
        self._backend = backend
        self.special_tokens = special_tokens  # bos_token/eos_token/... -> token text, only those set
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self._chat_templates = chat_templates  # name -> Jinja source; "default" is the main one
        self._compiled: dict[str, jinja2.Template] = {}
        self._folder = folder

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"Tokenizer folder '{folder}' does not exist or is not a directory.")
        backend = _load_backend(folder)
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}

        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_text(config.get(name), f"{config_path} field '{name}'")
            if token is not None:
                special_tokens[name] = token

        def id_of(name: str) -> int | None:
            if name not in special_tokens:
                return None
            token_id = backend.token_to_id(special_tokens[name])
            if token_id is None:
                raise CheckpointError(
                    f"{config_path} sets {name} to '{special_tokens[name]}', "
                    f"which is not a token of {folder / 'tokenizer.json'}."
                )
            return token_id

        eos_ids: list[int] = []
        if (eos_id := id_of("eos_token")) is not None:
            eos_ids.append(eos_id)
        generation = _read_optional(folder / "generation_config.json")
        model_config = _read_optional(folder / "config.json")
        eos_ids += _id_list(
            generation.get("eos_token_id"), f"{folder / 'generation_config.json'} field 'eos_token_id'"
        )
        eos_ids += _id_list(
            model_config.get("eos_token_id"), f"{folder / 'config.json'} field 'eos_token_id'"
        )

        pad_token_id = id_of("pad_token")
        if pad_token_id is None:
            pad = _id_list(
                generation.get("pad_token_id"), f"{folder / 'generation_config.json'} field 'pad_token_id'"
            )
            pad_token_id = pad[0] if pad else None

        return cls(
            backend,
            special_tokens=special_tokens,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),  # ordered union: tokenizer, generation, model config
            pad_token_id=pad_token_id,
            chat_templates=_load_chat_templates(folder, config, config_path),
            folder=folder,
        )

    # -- text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids, as in transformers."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token's text, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (used by the streaming detokenizer)."""
        return self._backend

    # -- chat --------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._chat_templates.get(_DEFAULT_TEMPLATE)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (OpenAI-style dicts) into the prompt text the model was trained on.

        Extra keyword arguments become template variables (e.g. ``enable_thinking=False`` for Qwen3)
        and override the special-token variables of the same name.
        """
        if tools is not None and _TOOL_USE_TEMPLATE in self._chat_templates:
            name = _TOOL_USE_TEMPLATE
        elif _DEFAULT_TEMPLATE in self._chat_templates:
            name = _DEFAULT_TEMPLATE
        else:
            where = self._folder or "this tokenizer's folder"
            raise ConfigError(
                f"{where}/tokenizer_config.json has no chat_template (and there is no chat_template.jinja), "
                "so chat messages cannot be turned into a prompt; send a plain prompt or use an "
                "instruct checkpoint."
            )
        if not messages:
            raise RequestError("The request has an empty 'messages' list; expected at least one message.")
        if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
            raise RequestError("Every entry of 'tools' must be a JSON object (a function schema).")
        variables = {
            **self.special_tokens,
            **plain(kwargs),
            "messages": template_messages(messages),
            "tools": plain(tools),
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        template = self._compile(name)
        try:
            return template.render(**variables)
        except TemplateRaised as e:
            raise RequestError(f"The chat template rejected the messages: {e.message}") from None
        except (jinja2.exceptions.UndefinedError, TypeError) as e:
            raise RequestError(
                f"The chat template could not render the messages ({e}); check each message's fields."
            ) from None
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"The chat template '{name}' failed while rendering: {e}.") from None

    def _compile(self, name: str) -> jinja2.Template:
        if name not in self._compiled:
            try:
                self._compiled[name] = jinja_environment().from_string(self._chat_templates[name])
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise ConfigError(
                    f"The chat template '{name}' of {self._folder} is not valid Jinja: "
                    f"{e.message} (line {e.lineno})."
                ) from None
        return self._compiled[name]


def _load_backend(folder: Path) -> tokenizers.Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            found = "only vocab.json and merges.txt (a slow tokenizer)"
        elif (folder / "tokenizer.model").is_file():
            found = "only tokenizer.model (a SentencePiece slow tokenizer)"
        else:
            found = "no tokenizer files"
        raise CheckpointError(
            f"Tokenizer folder '{folder}' has {found}, but qwen1m supports only fast tokenizers saved as "
            "tokenizer.json (re-save the tokenizer with transformers' save_pretrained to produce one)."
        )
    _read_json(path)  # a clear error for broken JSON before tokenizers' own message
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for schema errors
        raise CheckpointError(f"{path} is not a tokenizer the tokenizers library can load: {e}.") from None


def _load_chat_templates(folder: Path, config: dict[str, Any], config_path: Path) -> dict[str, str]:
    """name -> template; .jinja files take priority over tokenizer_config.json, as in transformers 5."""
    raw = config.get("chat_template")
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates[_DEFAULT_TEMPLATE] = raw
    elif isinstance(raw, list):
        for i, entry in enumerate(raw):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ConfigError(
                    f"{config_path} field 'chat_template[{i}]' must be an object with string "
                    "'name' and 'template'."
                )
            templates[entry["name"]] = entry["template"]
    elif raw is not None:
        raise ConfigError(
            f"{config_path} field 'chat_template' must be a string or a list of {{name, template}} objects, "
            f"got {type(raw).__name__}."
        )
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files[_DEFAULT_TEMPLATE] = folder / "chat_template.jinja"
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        files.update({p.name.removesuffix(".jinja"): p for p in sorted(extra_dir.glob("*.jinja"))})
    if files:
        templates = {name: p.read_text(encoding="utf-8") for name, p in files.items()}
    return templates


def _token_text(value: Any, where: str) -> str | None:
    """A special token given as a string or as an AddedToken dict ``{"content": ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"{where} must be a string or an object with 'content', got {value!r}.")


def _id_list(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ConfigError(f"{where} must be an integer or a list of integers, got {value!r}.")


def _read_optional(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} could not be read as UTF-8 text: {e}.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data
