"""OpenAI's request and response shapes as pydantic models (the subset qwen1m serves).

Requests accept OpenAI's field names plus vLLM's sampling extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ...; the openai client merges ``extra_body`` into the JSON
body, so the server sees them as fields like any other). A field the server does not know gets a
400 that names it (``use_beam_search``, ``length_penalty``, ``guided_json``, a misspelt name ...):
a silently different answer is worse than an error. ``UNSUPPORTED`` lists fields that are refused
only when set to something other than "off"; ``IGNORED`` lists OpenAI fields that change nothing
in the answer (``user``, ``metadata``, ...) and are accepted.

A field left out takes the model's value from its ``generation_config.json`` when it has one
(``sampling_params(defaults)``), else OpenAI's default. Chat requests take ``tools`` (OpenAI function
tools, rendered by the chat template) with ``tool_choice`` "auto" or "none"; every route takes
``response_format`` {"type": "json_object"} (constrained decoding, ``qwen1m.constrained``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from qwen1m.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, SEED_MAX, SamplingParams

MAX_STOP = 16  # stop strings per request (OpenAI allows 4); each is searched for at every step
MAX_STOP_TOKEN_IDS = 1024
QUOTE_CHARS = 200  # an error message quotes at most this much of a value the client sent
# variables the server itself gives the chat template: chat_template_kwargs may not replace them
RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "tools", "documents")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escape parses to one; UTF-8 has none

MAX_TOOLS = 128  # OpenAI's bound; each tool's schema is rendered into every prompt
# field -> the values that mean "off"; anything else asks for a feature this server lacks (tools and
# tool_choice are fields of chat requests: these entries refuse them on /v1/completions)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "use_beam_search": (None, False),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),  # the deprecated name of tools: send tools
    "function_call": (None, "none"),
}
# OpenAI fields that change nothing in the answer: accepted and ignored
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a 5 MB bad value must not
    come back as a 10 MB error."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class OpenAIError(Exception):
    """An error answered with OpenAI's error object and an HTTP status."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))


def _find_surrogate(value: Any, path: str = "") -> str | None:
    """The field path of the first string holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = _find_surrogate(key, where) or _find_surrogate(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- requests -----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema's body: refused with its type below

    type: str

    @field_validator("type")
    @classmethod
    def _known(cls, v):
        if v == "json_schema":
            raise ValueError("type 'json_schema' is not supported (only 'json_object' and 'text' are)")
        if v not in ("text", "json_object"):
            raise ValueError(f"type {quote(v, 60)} is unknown; expected 'json_object' or 'text'")
        return v


class GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    # Python's JSON parser reads NaN and Infinity: no float field takes them
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default 1.0
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)  # and seed + n - 1 too (SamplingParams)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # penalties (OpenAI's two and vLLM's repetition_penalty) and OpenAI's logit_bias, whose keys are
    # token ids written as strings
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    logit_bias: dict[str, float] | None = None
    best_of: int | None = Field(None, ge=1)  # only n: every generated completion is returned
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's extension
    response_format: ResponseFormat | None = None  # {"type": "json_object"}: the output is one JSON object

    @property
    def json_mode(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _find_surrogate(data)
        if where is not None:
            where = where if len(where) <= QUOTE_CHARS else where[:QUOTE_CHARS] + "..."  # keys are input too
            raise ValueError(f"'{where}' holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                             "which is not text; send valid Unicode")
        return data

    @model_validator(mode="after")
    def _reject_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED:
                if value not in UNSUPPORTED[name]:
                    raise ValueError(f"'{name}' is not supported by this server; leave it unset")
            elif name not in IGNORED:
                raise ValueError(f"'{name if len(name) <= 60 else name[:60] + '...'}' is not a field this server knows "
                                 "(as a field or in extra_body); leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"'best_of' must equal n ({self.n}) when set: every generated completion is "
                             "returned, so there is nothing to choose the best of")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (as strings, e.g. \"50256\"), got {quote(key, 60)}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"values must be in [-100, 100], got {bias} for token {key}")
        return v

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per generated token (None: no logprobs); each route reads its own fields."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Engine parameters. ``max_tokens``: the value to use (the server resolves its default);
        ``defaults``: the model's generation_config.json values (``load_generation_defaults``), used
        for the fields the request leaves out before OpenAI's own defaults."""
        defaults = defaults or {}

        def pick(name: str, openai_default: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, openai_default)

        return SamplingParams(
            n=self.n,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            logprobs=self.num_logprobs,
            prompt_logprobs=self.num_prompt_logprobs,
        )

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs


class CompletionRequest(GenerationRequest):
    # a string, a list of strings, a list of token ids, or a list of token-id lists
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top logprobs per token (OpenAI allows 5)
    echo: bool = False  # the prompt before the completion (with its logprobs when logprobs is set)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        if self.echo and self.logprobs is not None:  # the echoed prompt's tokens carry logprobs too
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("the prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, got a '{self.type}' part")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")  # OpenAI's rule (and '.')
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, given to the template as it is
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """One of ``tools``: OpenAI's function tool."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionCallMessage(BaseModel):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string; chat templates want the object

    @field_validator("arguments")
    @classmethod
    def _object(cls, v):
        if isinstance(v, str):  # parsed as vLLM does: the Qwen2.5 template writes it with tojson
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"must be a JSON object (as a string), but it is not valid JSON ({e.msg})") from None
            if not isinstance(v, dict):
                raise ValueError("must be a JSON object (as a string)")
        return v


class ToolCallMessage(BaseModel):
    """A call in an assistant message of the history (what an earlier response returned)."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallMessage


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # reasoning_content, name, ... go to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, and 'developer' read as 'system'."""
        data = self.model_dump(exclude_none=True)
        data["role"] = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            data["content"] = "".join(part.text or "" for part in self.content)
        return data


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients' name for max_tokens
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false} for Qwen3
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none"] | None = None  # None: "auto" when there are tools

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tools_enabled(self) -> bool:
        """Whether the template gets the tools and the output is parsed for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools_enabled else None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _auto_or_none(cls, v):
        if v is None or v in ("auto", "none"):
            return v
        what = "a named function" if isinstance(v, dict) else quote(v, 60)
        raise ValueError(f"{what} is not supported yet; use 'auto' (the default with tools) or 'none'")

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_variables(cls, v):
        for key in v or {}:
            if key in RESERVED_TEMPLATE_VARIABLES:  # tools go in 'tools', where they are checked
                raise ValueError(f"'{key}' is set by the server ({', '.join(RESERVED_TEMPLATE_VARIABLES)} are); "
                                 "leave it out of chat_template_kwargs")
            if key in UNSUPPORTED:  # functions stay refused however they arrive
                raise ValueError(f"'{key}' is not supported by this server, in chat_template_kwargs or elsewhere")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ----------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (--enable-prefix-caching)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)  # where each token's text starts in the choice's text
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: the first echoed prompt token
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: only tool calls
    tool_calls: list[dict[str, Any]] | None = None  # tool_parser.ToolCall.openai()

    @model_serializer
    def _calls_when_any(self) -> dict[str, Any]:
        # OpenAI writes "content": null next to calls, and no "tool_calls" key without them
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = self.tool_calls
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # each with its "index" among the choice's calls

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        # OpenAI sends {"role": "assistant", "content": ""} first, then {"content": ...}, then {}
        fields = (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
        return {k: v for k, v in fields if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen1m"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
