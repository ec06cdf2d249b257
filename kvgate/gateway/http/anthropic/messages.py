"""Anthropic-compatible /v1/messages and /v1/messages/count_tokens.

The prompt (tools, system, messages, ``cache_control`` breakpoints as TTL segments) is
``protocol.anthropic``'s; tool use and the content blocks of the answer are
``anthropic_tools``'. This module validates the rest and speaks the Messages shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from kvgate.gateway.edge.body import prepare, read_body
from kvgate.gateway.edge.context import ctx_of
from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.edge.sse import open_stream, send
from kvgate.gateway.engine import SamplingParams
from kvgate.gateway.engine.structured import StructuredSpec, json_schema_spec
from kvgate.gateway.http.admission import admitted
from kvgate.gateway.http.caches.named import named_cache, pin_named
from kvgate.gateway.http.generation import Generation
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.http.validation import check_model, token_budget
from kvgate.gateway.protocol.anthropic import (
    Conversation,
    parse_conversation,
    ttl_of,
    ttl_segments,
)
from kvgate.gateway.protocol.anthropic_tools import (
    Blocks,
    ToolChoice,
    forced_grammar,
    parse_tool_choice,
)
from kvgate.gateway.protocol.body import field, number, reject, stop_list
from kvgate.gateway.protocol.cache_request import CacheRequest, anthropic_cache_request
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.params import default_temperature, model_defaults
from kvgate.gateway.protocol.priority import priority_of
from kvgate.gateway.protocol.tool_parsers import ToolParser, repeat_guard
from kvgate.gateway.usage import Usage

_UNSUPPORTED = {
    "thinking": "extended thinking is not implemented",
    "mcp_servers": "MCP servers are not supported",
    "container": "containers are not supported",
}
_STOP = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}


def _stop_reason(gen: Generation, blocks: Blocks) -> str:
    if blocks.calls:  # the answer calls tools: the client runs them and comes back
        return "tool_use"
    if gen.stop_sequence is not None:  # one of the request's stop_sequences ended it
        return "stop_sequence"
    return _STOP.get(gen.finish_reason or "stop", "end_turn")


def anthropic_usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.uncached_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": u.cache_write_5m_tokens,
                           "ephemeral_1h_input_tokens": u.cache_write_1h_tokens},
        "service_tier": "standard",
    }


@dataclass
class _Prompt:
    """What a Messages body renders to; a real request and count_tokens share it."""

    model: str
    conversation: Conversation
    choice: ToolChoice | None
    ids: list[int]


def _prompt(state: AppState, body: dict) -> _Prompt:
    model = field(body, "model", str, required=True)
    conv = parse_conversation(body)
    reject(body, _UNSUPPORTED)
    choice = parse_tool_choice(body, conv.tools)
    model = check_model(state, model)
    return _Prompt(model, conv, choice, conv.render(state.engine))


@dataclass
class _Prepared:
    """A request ready for the engine: what ``prepare`` builds from the body."""

    model: str
    stream: bool
    prompt: list[int]
    sampling: SamplingParams
    segments: list[tuple[int, float]]
    choice: ToolChoice | None
    parser: ToolParser | None
    cache: CacheRequest
    priority: int = 0


def _prepare(state: AppState, body: dict) -> _Prepared:
    """Validation, chat template and tokenizing (breakpoints included); may run on a worker
    thread (``prepare``)."""
    max_tokens = field(body, "max_tokens", int, required=True)
    stream = field(body, "stream", bool, default=False)
    p = _prompt(state, body)
    top_level = ttl_of(body.get("cache_control"), "cache_control")
    budget = token_budget(state, len(p.ids), max_tokens, "max_tokens")
    defaults = model_defaults(state.engine.model_info)
    top_k = field(body, "top_k", int, default=int(defaults.get("top_k", 0)))
    if top_k < 0:
        raise bad_request("'top_k' must be >= 0.")
    parser = state.tool_parser if p.choice is not None else None
    sampling = SamplingParams(
        max_tokens=budget,
        temperature=number(body, "temperature", 0.0, 1.0,
                           min(default_temperature(body, defaults), 1.0)),
        top_p=number(body, "top_p", 0.0, 1.0, defaults.get("top_p", 1.0)), top_k=top_k,
        stop=stop_list(body, "stop_sequences", max_items=16))
    # A forced tool_choice makes the answer the call (the output format applies to later
    # turns' text); under auto with an output format, either calls or formatted text.
    structured = forced_grammar(p.choice, p.conversation.tools, parser, _output_format(body))
    if structured is not None:
        sampling = replace(sampling, structured=structured)
    if parser is not None and p.conversation.tools and p.choice is not None \
            and p.choice.kind != "none":
        sampling = repeat_guard(sampling, parser)
    segments = ttl_segments(state.engine, p.conversation, p.ids, top_level)
    return _Prepared(p.model, stream, p.ids, sampling, segments, p.choice, parser,
                     anthropic_cache_request(body), priority_of(body))


def _output_format(body: dict) -> StructuredSpec | None:
    """Anthropic's structured outputs: ``output_format`` (the beta's spelling) or
    ``output_config.format``, ``{"type": "json_schema", "schema": {...}}``: the answer's
    text follows the schema (strict, as Anthropic's are)."""
    fmt, param = body.get("output_format"), "output_format"
    config = body.get("output_config")
    if config is not None:
        if not isinstance(config, dict) or set(config) - {"format"}:
            raise bad_request("'output_config' may only hold 'format'.", param="output_config")
        if fmt is not None:
            raise bad_request("Send 'output_format' or 'output_config.format', not both.",
                              param="output_config")
        fmt, param = config.get("format"), "output_config.format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" \
            or not isinstance(fmt.get("schema"), dict) or set(fmt) - {"type", "schema"}:
        raise bad_request(f"'{param}' must be {{\"type\": \"json_schema\", \"schema\": "
                          "{...}}.", param=param)
    return json_schema_spec(fmt["schema"], strict=True)


def _count(state: AppState, body: dict) -> int:
    ttl_of(body.get("cache_control"), "cache_control")
    return len(_prompt(state, body).ids)


@admitted  # the tenant's request rate and concurrency apply: unbilled, not free
async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's tokens, rendered as the same body would be for /v1/messages: nothing
    is generated or billed."""
    state = state_of(request)
    n = await prepare(await read_body(request), lambda body: _count(state, body))
    return web.json_response({"input_tokens": n})


@admitted
async def messages(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    body, named = await named_cache(request, await read_body(request), "anthropic")
    p = await prepare(body, lambda body: _prepare(state, body))
    await pin_named(request, named, p.prompt)
    async with Generation(request, "messages", p.model, p.prompt, p.sampling,
                          p.segments, cache=p.cache, priority=p.priority) as gen:
        blocks = Blocks(p.parser, p.choice, eager=p.choice is None)
        if p.stream:
            return await _stream(request, gen, blocks)
        text = await gen.run()
        assert gen.usage is not None
        blocks.opening()
        blocks.feed(text)
        blocks.finish()
        return web.json_response({**_message(gen, blocks.content),
                                  "stop_reason": _stop_reason(gen, blocks),
                                  "stop_sequence": gen.stop_sequence,
                                  "usage": anthropic_usage(gen.usage),
                                  "receipt_id": gen.receipt_id})


def _message(gen: Generation, content: list) -> dict:
    return {"id": "msg_" + gen.request_id[4:], "type": "message", "role": "assistant",
            "model": gen.model, "content": content, "stop_reason": None,
            "stop_sequence": None}


async def _stream(request: web.Request, gen: Generation, blocks: Blocks) -> web.StreamResponse:
    """Anthropic's event sequence. ``message_start`` is sent after the first token, when
    the prompt's cache split (read, written, uncached) is final; ``message_delta`` carries
    the billed numbers (cumulative, as the SDK expects)."""
    pieces = gen.stream()
    piece = await anext(pieces, None)
    ctx_of(request).engine_s = gen.elapsed_s()
    resp = await open_stream(request)
    try:
        known = gen.prompt_usage or gen.usage
        if known is not None:
            start_usage = {**anthropic_usage(known), "output_tokens": 0}
        else:  # nothing generated and not finished: cannot happen, but never guess a split
            start_usage = {"input_tokens": len(gen.prompt_ids), "output_tokens": 0,
                           "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        await send(resp, {"type": "message_start",
                          "message": {**_message(gen, []), "usage": start_usage}},
                   "message_start")
        for name, data in blocks.opening():
            await send(resp, data, name)
        await send(resp, {"type": "ping"}, "ping")
        while piece is not None:
            for name, data in blocks.feed(piece):
                await send(resp, data, name)
            piece = await anext(pieces, None)
        assert gen.usage is not None  # billed before the closing events
        for name, data in blocks.finish():
            await send(resp, data, name)
        await send(resp, {"type": "message_delta",
                          "delta": {"stop_reason": _stop_reason(gen, blocks),
                                    "stop_sequence": gen.stop_sequence},
                          "usage": anthropic_usage(gen.usage)}, "message_delta")
        await send(resp, {"type": "message_stop"}, "message_stop")
        await resp.write_eof()
    except ClientGone:
        pass
    return resp
