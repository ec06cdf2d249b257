"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions (models: models_api)."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from aiohttp import web

from kvgate.gateway.edge.body import prepare, read_body
from kvgate.gateway.edge.context import ctx_of
from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.edge.sse import open_stream, send
from kvgate.gateway.engine import SamplingParams
from kvgate.gateway.http.admission import admitted
from kvgate.gateway.http.caches.named import named_cache, pin_named
from kvgate.gateway.http.choices import Choice
from kvgate.gateway.http.generation import Generation
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.http.validation import check_model, token_budget
from kvgate.gateway.protocol.body import field, reject
from kvgate.gateway.protocol.cache_request import (
    NO_CACHE_REQUEST,
    CacheRequest,
    openai_cache_request,
)
from kvgate.gateway.protocol.openai_chat import chat_messages, common_fields, openai_usage
from kvgate.gateway.protocol.openai_tools import (
    ToolDeltas,
    ToolRequest,
    finish_reason,
    forced_sampling,
    message,
    render_prompt,
    tool_request,
)
from kvgate.gateway.protocol.params import chat_logprobs, model_defaults, sampling_from
from kvgate.gateway.protocol.priority import priority_of
from kvgate.gateway.protocol.structured_outputs import structured_output
from kvgate.gateway.protocol.tool_parsers import parse_all

_UNSUPPORTED = {
    "functions": "the legacy 'functions' are not implemented; send 'tools'",
    "function_call": "the legacy 'function_call' is not implemented; send 'tool_choice'",
    "audio": "audio output is not implemented",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "web search is not implemented",
    "reasoning_effort": "this server's models do not reason; reasoning effort is not "
                        "implemented",
}
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _finish(gen: Generation) -> str:
    return _FINISH.get(gen.finish_reason or "stop", "stop")


def _finish_of(choice: Choice) -> str:
    return _FINISH.get(choice.finish_reason or "stop", "stop")


async def end_stream(resp: web.StreamResponse, base: dict[str, Any], gen: Generation,
                     include_usage: bool) -> None:
    """After the choices' last chunks: the usage chunk when asked for, ``[DONE]``, EOF."""
    assert gen.usage is not None  # billed: the ledger row exists before these bytes
    if include_usage:
        await send(resp, {**base, "choices": [], "usage": openai_usage(gen.usage)})
    await send(resp, "[DONE]")
    await resp.write_eof()


class _Prepared(NamedTuple):
    """A request ready for the engine: what ``prepare`` builds from the body."""

    model: str
    stream: bool
    include_usage: bool
    prompt: list[int]
    sampling: SamplingParams
    tools: ToolRequest | None = None  # chat only
    cache: CacheRequest = NO_CACHE_REQUEST
    priority: int = 0
    max_tokens_param: str | None = "max_tokens"  # None: the request named no bound


def _prepare_chat(state: AppState, body: dict) -> _Prepared:
    """Validation, chat template and tokenizing; may run on a worker thread (``prepare``)."""
    model, stream, include_usage = common_fields(body)
    messages = chat_messages(body)
    reject(body, _UNSUPPORTED)
    if body.get("web_search_options") is not None:  # even {} asks for a web search
        reject({"web_search_options": True}, _UNSUPPORTED)
    structured = structured_output(state.engine.grammars, body, chat=True)
    model = check_model(state, model)
    requested = field(body, "max_completion_tokens", int)
    param = "max_completion_tokens"
    if requested is None:
        requested, param = field(body, "max_tokens", int), "max_tokens"
    tools = tool_request(body, state.tool_parser)
    prompt = render_prompt(state.engine, messages, tools.tools)
    sampling = sampling_from(body, token_budget(state, len(prompt), requested, param),
                             chat=True, vocab_size=state.engine.vocab_size,
                             defaults=model_defaults(state.engine.model_info))
    sampling.structured = structured
    return _Prepared(model, stream, include_usage, prompt,
                     forced_sampling(state.engine.grammars, tools, sampling), tools, openai_cache_request(body),
                     priority_of(body), param if requested is not None else None)


@admitted
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body, named = await named_cache(request, await read_body(request), "openai")
    p = await prepare(body, lambda body: _prepare_chat(state, body))
    model, sampling, tools = p.model, p.sampling, p.tools
    assert tools is not None
    await pin_named(request, named, p.prompt)
    async with Generation(request, "chat.completions", model, p.prompt, sampling,
                          cache=p.cache, priority=p.priority,
                          max_tokens_param=p.max_tokens_param) as gen:
        if p.stream:
            return await _stream(request, gen, p.include_usage, chat=True, tools=tools)
        await gen.run()
        assert gen.usage is not None
        choices = []
        for c in gen.choices.items:  # n of them
            msg, has_calls = message(parse_all(tools.parser, c.text), tools)
            logprobs = None if sampling.logprobs is None else chat_logprobs(
                state.engine.tokenizer, c.logprobs)
            choices.append({"index": c.index, "logprobs": logprobs, "message": msg,
                            "finish_reason": finish_reason(_finish_of(c), has_calls)})
        return web.json_response({
            "id": "chatcmpl-" + gen.request_id[4:], "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": openai_usage(gen.usage), "receipt_id": gen.receipt_id})


async def _stream(request: web.Request, gen: Generation, include_usage: bool,
                  chat: bool, tools: ToolRequest | None = None) -> web.StreamResponse:
    """Chunks as the SDK expects; the first engine event arrives before the headers, so
    engine errors (prompt too long, overloaded) still get a proper status code."""
    created = int(time.time())
    base: dict[str, Any] = {"id": ("chatcmpl-" if chat else "cmpl-") + gen.request_id[4:],
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": gen.model}
    if include_usage:
        base["usage"] = None

    # text → content/tool_calls, one per choice (n)
    deltas = [ToolDeltas(tools or ToolRequest(choice="none")) for _ in gen.choices.items]

    def chunk(piece: str | dict | None, finish: str | None, index: int = 0,
              logprobs: dict | None = None) -> dict:
        if chat:
            delta = {} if piece is None else piece if isinstance(piece, dict) else {
                "content": piece}
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            if logprobs is not None:
                choice["logprobs"] = logprobs
        else:
            choice = {"index": index, "text": piece or "", "logprobs": None,
                      "finish_reason": finish}
        return {**base, "choices": [choice]}

    events = gen.events()
    ev = await anext(events, None)
    ctx_of(request).engine_s = gen.elapsed_s()
    resp = await open_stream(request)
    try:
        for c in gen.choices.items if chat else []:
            first = chunk(None, None, c.index)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await send(resp, first)
        while ev is not None:
            i = ev.index
            logprobs = None  # the event's tokens, sent with its first delta (or alone)
            if gen.sampling.logprobs is not None and ev.logprobs:
                logprobs = chat_logprobs(state_of(request).engine.tokenizer, ev.logprobs)
            pieces: list[str | dict | None] = []
            if ev.text:
                pieces = list(deltas[i].feed(ev.text)) if chat else [ev.text]
            for piece in pieces or ([None] if logprobs is not None else []):
                await send(resp, chunk(piece, None, i, logprobs))
                logprobs = None
            ev = await anext(events, None)
        for c in gen.choices.items:
            for delta in deltas[c.index].finish() if chat else []:
                await send(resp, chunk(delta, None, c.index))
            await send(resp, chunk(None, deltas[c.index].finish_reason(_finish_of(c)),
                                   c.index))
        await end_stream(resp, base, gen, include_usage)
    except ClientGone:
        pass
    return resp
