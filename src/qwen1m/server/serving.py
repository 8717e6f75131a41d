"""Engine <-> protocol: turn OpenAI requests into engine requests and engine outputs into
OpenAI responses, whole or as server-sent events.

Tokenizing runs in a worker process (``tokenize.py``; a 1M-token prompt takes seconds to encode, with
the GIL held) and chat templating in a thread, so neither the event loop nor the engine loop waits on
them. Each prompt becomes one engine request with ``n`` completions; choice ``i * n + j`` is
completion ``j`` of prompt ``i``, as in OpenAI.

A request holds a place in the queue (``limits.QueueGate``) from its arrival to its first output, so
the work waiting for the engine, tokenizing included, is bounded: past the limit the answer is 429.

max_tokens left out: the model's ``max_new_tokens`` (generation_config.json), else OpenAI's 16 for
completions and ``default_max_tokens`` (--default-max-tokens) for chat, each cut to the room the
prompt leaves in max_model_len. A max_tokens the client sets and that does not fit is a 400 (the
engine's RequestError), never silently trimmed.

Chat requests with tools have each choice's text parsed for ``<tool_call>`` blocks (``tool_parser``):
whole answers get ``message.tool_calls``, streams a delta per call as it closes.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qwen1m.constrained import json_object_processor
from qwen1m.errors import Qwen1mError, RequestError
from qwen1m.outputs import RequestOutput
from qwen1m.sampling_params import SamplingParams
from qwen1m.server.engine_loop import EngineLoop, EngineRequest, EngineUnavailable, RequestStream
from qwen1m.server.limits import DEFAULT_MAX_TOKENS, QueueGate, ServerLimits, Ticket
from qwen1m.server.logprobs import chat_logprobs, completion_logprobs
from qwen1m.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    GenerationRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    PromptTokensDetails,
    UsageInfo,
    quote,
)
from qwen1m.server.tokenize import TokenizerPool
from qwen1m.server.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls

Kind = Literal["completion", "chat"]
MAX_ERROR_CHARS = 1000  # an error message's length: each quotes ~200 characters of input at most
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class _Choices:
    """Per-choice text deltas from successive RequestOutputs.

    While a choice runs, the last ``holdback`` characters stay unsent: they may be the start of a
    stop string that the engine will cut from the text, and sent text cannot be taken back.
    """

    def __init__(self, request_ids: list[str], n: int, holdback: int, echo: list[str] | None = None):
        self.first_choice = {rid: i * n for i, rid in enumerate(request_ids)}
        self.request_of = [rid for rid in request_ids for _ in range(n)]  # choice -> its engine request
        self.echo = echo  # per prompt: its text, sent before each of its choices (completions' echo)
        self.holdback = holdback
        self.sent = [0] * (len(request_ids) * n)  # characters of each choice's text already emitted
        self.texts = [""] * len(self.sent)
        self.finish_reasons: list[str | None] = [None] * len(self.sent)
        self.completion_tokens = [0] * len(self.sent)
        self.prompt_tokens: dict[str, int] = {}
        self.cached_tokens: dict[str, int] = {}
        # logprobs: each choice's token ids and entries so far, how many were sent (streams), where
        # the next sent token's text starts; each request's prompt ids and prompt logprobs
        self.token_ids: list[list[int]] = [[] for _ in self.sent]
        self.logprobs: list[list] = [[] for _ in self.sent]
        self.logprobs_sent = [0] * len(self.sent)
        self.text_offsets = [len(echo[i // n]) if echo else 0 for i in range(len(self.sent))]
        self.prompt_ids: dict[str, list[int]] = {}
        self.prompt_logprobs: dict[str, list] = {}
        self.echoed = [False] * len(self.sent)

    def update(self, out: RequestOutput) -> list[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason or None) for each choice that changed."""
        self.prompt_tokens[out.request_id] = len(out.prompt_token_ids)
        self.cached_tokens[out.request_id] = out.num_cached_tokens
        self.prompt_ids[out.request_id] = out.prompt_token_ids
        self.prompt_logprobs[out.request_id] = out.prompt_logprobs or []
        changes = []
        for o in out.outputs:
            i = self.first_choice[out.request_id] + o.index
            if self.finish_reasons[i] is not None:
                continue
            self.texts[i] = o.text
            self.completion_tokens[i] = len(o.token_ids)
            self.token_ids[i], self.logprobs[i] = o.token_ids, o.logprobs or []
            end = len(o.text) if o.finish_reason else max(self.sent[i], len(o.text) - self.holdback)
            delta, self.sent[i] = o.text[self.sent[i]:end], end
            self.finish_reasons[i] = o.finish_reason
            if delta or o.finish_reason:
                changes.append((i, delta, o.finish_reason))
        return changes

    def take_logprobs(self, i: int) -> tuple[list, list[int]]:
        """The logprob entries of choice i not sent yet, and their token ids (streams)."""
        start, end = self.logprobs_sent[i], len(self.logprobs[i])
        self.logprobs_sent[i] = end
        return self.logprobs[i][start:end], self.token_ids[i][start:end]

    def usage(self) -> UsageInfo:
        prompt, completion = sum(self.prompt_tokens.values()), sum(self.completion_tokens)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())))


class OpenAIServing:
    def __init__(self, engine_loop: EngineLoop, tokenizer, *, model_name: str, max_model_len: int,
                 limits: ServerLimits, generation_defaults: dict | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, eos_token_ids: tuple[int, ...] = ()):
        """generation_defaults: the model's generation_config.json values (``LLM.generation_defaults``);
        eos_token_ids: the engine's, which JSON mode allows once the object is complete."""
        self.engine_loop = engine_loop
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.limits = limits
        self.generation_defaults = dict(generation_defaults or {})
        self.default_max_tokens = default_max_tokens
        self.eos_token_ids = tuple(eos_token_ids)
        self.gate = QueueGate(limits.max_queued_requests)
        self.tokenizer_pool = TokenizerPool(tokenizer, max_model_len) if tokenizer is not None else None
        self.created = int(time.time())
        # a token's text alone, for logprobs ("token_id:<id>" without a tokenizer, as vLLM writes it)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(
            (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer is not None
            else (lambda t: f"token_id:{t}"))

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created,
                                         max_model_len=self.max_model_len)])

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise OpenAIError(404, f"The model {quote(name)} does not exist; this server serves "
                              f"'{self.model_name}'.", param="model", code="model_not_found")

    async def completions(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        prompts = req.prompts()
        if len(prompts) > self.limits.max_prompts_per_request:
            raise OpenAIError(400, f"The request has {len(prompts)} prompts; this server takes at most "
                              f"{self.limits.max_prompts_per_request} per request (--max-prompts-per-request).",
                              param="prompt")
        ticket = self.gate.enter()
        try:
            ids = [await self._encode(p) for p in prompts]
            params = await self._params(req, req.max_tokens, ids, COMPLETIONS_MAX_TOKENS)
            echo = [self._prompt_text(p, i) for p, i in zip(prompts, ids)] if req.echo else None
            return await self._generate("completion", req, ids, params, request, ticket, echo)
        except BaseException:
            ticket.release()
            raise
        finally:
            if not req.stream:  # a stream's ticket goes with its RequestStream (released at its first output)
                ticket.release()

    async def chat(self, req: ChatCompletionRequest, request: Request):
        self.check_model(req.model)
        if self.tokenizer is None:
            raise RequestError("This model has no tokenizer.json, so chat messages cannot be turned into a "
                               "prompt; use /v1/completions with token ids.")
        ticket = self.gate.enter()
        try:
            messages = [m.template_dict() for m in req.messages]
            text = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages,
                                           add_generation_prompt=req.add_generation_prompt,
                                           tools=req.template_tools(), **(req.chat_template_kwargs or {}))
            ids = [await self._encode(text)]
            params = await self._params(req, req.max_new_tokens, ids, self.default_max_tokens)
            return await self._generate("chat", req, ids, params, request, ticket)
        except BaseException:
            ticket.release()
            raise
        finally:
            if not req.stream:
                ticket.release()

    async def _params(self, req: GenerationRequest, max_tokens: int | None, prompts: list[list[int]],
                      route_default: int) -> SamplingParams:
        """The request's SamplingParams: fields left out from the model's defaults, max_tokens as the
        module docstring says, and JSON mode's logits processor."""
        if max_tokens is None:
            room = self.max_model_len - max(map(len, prompts))
            max_tokens = max(1, min(self.generation_defaults.get("max_tokens", route_default), room))
        params = req.sampling_params(max_tokens, self.generation_defaults)
        if req.json_mode:
            if self.tokenizer is None:
                raise RequestError("'response_format' json_object needs the model's tokenizer.json, which this "
                                   "model lacks; leave response_format unset.")
            # the first request builds the tokenizer's token table (a second for 152K tokens): a thread
            params.logits_processors = [await asyncio.to_thread(
                json_object_processor, self.tokenizer, max_tokens, eos_token_ids=self.eos_token_ids)]
        return params

    def _prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        """What ``echo`` puts before a completion: the prompt as sent, or its token ids' text."""
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise RequestError("'echo' with token-id prompts needs the model's tokenizer.json, which this "
                               "model lacks; leave echo unset.")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    async def _encode(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return prompt
        if self.tokenizer_pool is None:
            raise RequestError("This model has no tokenizer.json, so prompts must be lists of token ids.")
        ids = await self.tokenizer_pool.encode(prompt)
        if len(ids) >= self.max_model_len:  # refused here, not after a trip through the engine thread
            raise RequestError(f"Too long: the prompt has {len(ids)} tokens but max_model_len is "
                               f"{self.max_model_len}; shorten the prompt or raise max_model_len.")
        return ids

    async def _generate(self, kind: Kind, req: GenerationRequest, prompts: list[list[int]],
                        params: SamplingParams, request: Request, ticket: Ticket,
                        echo: list[str] | None = None) -> Response:
        response_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        requests = [EngineRequest(f"{response_id}-{i}", ids, params) for i, ids in enumerate(prompts)]
        stream = await self.engine_loop.submit(requests, ticket)
        holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        choices = _Choices(stream.request_ids, params.n, holdback, echo)
        if req.stream:
            events = self._events(kind, req, response_id, stream, choices)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # Starlette notices a vanished client only for streams: watch for it here too
        watcher = asyncio.create_task(_interrupt_on_disconnect(request, stream))
        try:
            async for out in stream:
                choices.update(out)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        finally:
            watcher.cancel()
            stream.close()
        return JSONResponse(self._full_response(kind, req, response_id, choices).model_dump())

    def _full_response(self, kind: Kind, req: GenerationRequest, response_id: str, choices: _Choices):
        head = dict(id=response_id, created=int(time.time()), model=self.model_name, usage=choices.usage())
        finished = list(enumerate(zip(choices.texts, choices.finish_reasons)))
        if kind == "completion":
            out = []
            for i, (t, f) in finished:
                entries, ids = choices.logprobs[i], choices.token_ids[i]
                if choices.echo:
                    rid = choices.request_of[i]
                    t = choices.echo[i // req.n] + t
                    entries, ids = choices.prompt_logprobs[rid] + entries, choices.prompt_ids[rid] + ids
                logprobs = None
                if req.num_logprobs is not None:
                    logprobs = completion_logprobs(entries, ids, 0, self.token_text)
                out.append(CompletionChoice(index=i, text=t, finish_reason=f, logprobs=logprobs))
            return CompletionResponse(**head, choices=out)
        out = []
        for i, (t, f) in finished:
            content, calls = parse_tool_calls(t) if req.tools_enabled else (t, [])
            message = ChatResponseMessage(content=content, tool_calls=[c.openai() for c in calls] or None)
            out.append(ChatChoice(index=i, message=message, finish_reason="tool_calls" if calls else f,
                                  logprobs=self._chat_logprobs(req, choices.logprobs[i], choices.token_ids[i])))
        return ChatCompletionResponse(**head, choices=out)

    def _chat_logprobs(self, req: GenerationRequest, entries: list, ids: list[int]):
        if req.num_logprobs is None:
            return None
        return chat_logprobs(entries, ids, req.num_logprobs, self.token_text)

    def _stream_logprobs(self, kind: Kind, req: GenerationRequest, choices: _Choices, index: int):
        """The logprobs of choice ``index``'s tokens not sent yet (None when none were asked for)."""
        if req.num_logprobs is None:
            return None
        entries, ids = choices.take_logprobs(index)
        if not entries:
            return None
        if kind == "chat":
            return self._chat_logprobs(req, entries, ids)
        lp = completion_logprobs(entries, ids, choices.text_offsets[index], self.token_text)
        choices.text_offsets[index] += sum(map(len, lp.tokens))
        return lp

    async def _events(self, kind: Kind, req: GenerationRequest, response_id: str, stream: RequestStream,
                      choices: _Choices) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them, ending with ``data: [DONE]``.

        A client that disconnects cancels this generator (Starlette watches for it), and the
        ``finally`` aborts the engine requests, which frees their KV cache.
        """
        head = dict(id=response_id, created=int(time.time()), model=self.model_name)
        include_usage = req.include_usage

        # tools: each chat choice's deltas go through a parser that turns <tool_call> blocks into calls
        parsers = [ToolCallStreamParser() for _ in choices.sent] if kind == "chat" and req.tools_enabled else None

        def chunk(index: int, text: str | None, finish: str | None, role: str | None = None, logprobs=None,
                  tool_calls: list | None = None) -> str:
            if kind == "completion":
                choice = CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=logprobs)
                body = CompletionResponse(**head, choices=[choice])
            else:
                delta = DeltaMessage(role=role, content=text, tool_calls=tool_calls)
                body = ChatCompletionChunk(**head, choices=[ChatStreamChoice(index=index, delta=delta,
                                                                             finish_reason=finish, logprobs=logprobs)])
            # OpenAI sends "usage": null in every chunk only when the client asked for usage
            return _sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        try:
            if kind == "chat":
                for i in range(len(choices.sent)):
                    yield chunk(i, "", None, role="assistant")
            async for out in stream:
                for index, delta, finish in choices.update(out):
                    if choices.echo and not choices.echoed[index]:  # the prompt first, with its logprobs
                        choices.echoed[index] = True
                        rid = choices.request_of[index]
                        echo_lp = None if req.num_logprobs is None else completion_logprobs(
                            choices.prompt_logprobs[rid], choices.prompt_ids[rid], 0, self.token_text)
                        yield chunk(index, choices.echo[index // req.n], None, logprobs=echo_lp)
                    logprobs = self._stream_logprobs(kind, req, choices, index)
                    if parsers is not None:
                        events = _tool_events(parsers[index], delta, finish is not None)
                        call_index = parsers[index].num_calls - sum(isinstance(e, ToolCall) for e in events)
                        for event in events:
                            if isinstance(event, ToolCall):
                                yield chunk(index, None, None, tool_calls=[event.openai(call_index)])
                                call_index += 1
                            else:
                                yield chunk(index, event, None, logprobs=logprobs)
                                logprobs = None
                        delta = ""  # sent as the parser's events
                        if finish and parsers[index].num_calls:
                            finish = "tool_calls"
                    if delta or logprobs is not None:
                        yield chunk(index, delta, None, logprobs=logprobs)
                    if finish:
                        yield chunk(index, None if kind == "chat" else "", finish)
            if include_usage:
                cls = CompletionResponse if kind == "completion" else ChatCompletionChunk
                yield _sse(cls(**head, choices=[], usage=choices.usage()).model_dump_json())
        except (Qwen1mError, EngineUnavailable) as e:
            # the status line is already sent: report the error in the stream, as OpenAI does
            yield _sse(error_body(e).body.model_dump_json())
        finally:
            stream.close()
        yield "data: [DONE]\n\n"


def _tool_events(parser: ToolCallStreamParser, delta: str, finished: bool) -> list[str | ToolCall]:
    """A choice's new text as the parser's events (what it held, too, once the choice finished)."""
    return parser.feed(delta) + (parser.finish() if finished else [])


def error_body(e: Exception) -> OpenAIError:
    """The OpenAI error (status and object) for an exception raised while serving a request."""
    if isinstance(e, OpenAIError):
        return e
    message = str(e)
    if len(message) > MAX_ERROR_CHARS:  # e.g. a template's own error quoting a message's content
        message = message[:MAX_ERROR_CHARS] + "..."
    if isinstance(e, EngineUnavailable):
        return OpenAIError(e.status_code, message, type="server_error" if e.status_code == 500 else
                           "service_unavailable_error")
    if isinstance(e, Qwen1mError):  # a bad prompt or sampling parameter, or no chat template
        code = "context_length_exceeded" if "max_model_len" in message else None
        return OpenAIError(400, message, code=code)
    return OpenAIError(500, f"Internal server error ({type(e).__name__}).", type="server_error")


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


class ClientDisconnected(Exception):
    """The client of a non-streamed request went away; its engine requests are already aborted."""


async def _interrupt_on_disconnect(request: Request, stream: RequestStream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.interrupt(ClientDisconnected())
