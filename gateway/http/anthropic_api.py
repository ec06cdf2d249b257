"""Anthropic-compatible /v1/messages, with ``cache_control`` breakpoints as TTL segments.

A breakpoint on a block marks every prompt token up to and including that block with the
breakpoint's TTL class; the token offset is found by rendering the conversation cut after
that block and taking its common prefix with the full rendering (chat templates close a
turn after its content, which the full prompt does not have at that point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.engine import SamplingParams
from gateway.http.admission import admitted
from gateway.http.errors import ClientGone, bad_request
from gateway.http.generation import Generation
from gateway.http.sse import open_stream, send
from gateway.http.state import AppState, ctx_of, state_of
from gateway.http.validation import (
    check_model,
    field,
    number,
    prepare,
    read_body,
    reject,
    stop_list,
    token_budget,
)
from gateway.usage import Usage

if TYPE_CHECKING:  # the engine pulls in torch; the ledger-only CLI must not
    from gateway.engine.engine import Engine

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
MAX_BREAKPOINTS = 4
_UNSUPPORTED = {
    "tools": "tool use is not implemented",
    "tool_choice": "tool use is not implemented",
    "thinking": "extended thinking is not implemented",
    "mcp_servers": "MCP servers are not supported",
    "container": "containers are not supported",
}
_STOP = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}


def _stop_reason(gen: Generation) -> str:
    if gen.stop_sequence is not None:  # one of the request's stop_sequences ended it
        return "stop_sequence"
    return _STOP.get(gen.finish_reason or "stop", "end_turn")


@dataclass
class Breakpoint:
    message: int  # index into the rendered message list (system first, if any)
    block: int  # index of the block inside that message
    ttl_s: float


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


def _ttl(cc: Any, param: str) -> float | None:
    if cc is None:
        return None
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise bad_request(f"'{param}' must be an object with type 'ephemeral' and an "
                          "optional ttl of '5m' or '1h'.")
    ttl = cc.get("ttl", "5m")
    if not isinstance(ttl, str) or ttl not in TTL_SECONDS:
        raise bad_request(f"'{param}.ttl' must be \"5m\" or \"1h\", got {ttl!r}.")
    return TTL_SECONDS[ttl]


def _blocks(content: Any, param: str) -> list[tuple[str, float | None]]:
    """(text, ttl of a breakpoint on this block) for each block of one message."""
    if isinstance(content, str):
        return [(content, None)]
    if not isinstance(content, list) or not content:
        raise bad_request(f"'{param}' must be a string or a non-empty list of text blocks.")
    out = []
    for j, block in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text" \
                or not isinstance(block.get("text"), str):
            raise bad_request(f"'{p}' must be a text block; images, documents and tool blocks "
                              "are not supported.")
        out.append((block["text"], _ttl(block.get("cache_control"), f"{p}.cache_control")))
    return out


def parse_conversation(body: dict) -> tuple[list[str], list[list[tuple[str, float | None]]]]:
    """Roles and blocks, system first; validates shape and roles."""
    roles: list[str] = []
    blocks: list[list[tuple[str, float | None]]] = []
    system = body.get("system")
    if system is not None and system != "" and system != []:
        roles.append("system")
        blocks.append(_blocks(system, "system"))
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_request("'messages' must hold at least one message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"'messages[{i}]' must be an object with role 'user' or "
                              "'assistant'.")
        roles.append(m["role"])
        blocks.append(_blocks(m.get("content"), f"messages[{i}].content"))
    return roles, blocks


def _render(engine: Engine, roles: list[str], blocks: list[list[tuple[str, float | None]]],
            upto: Breakpoint | None = None) -> list[int]:
    msgs = []
    for i, (role, bl) in enumerate(zip(roles, blocks, strict=False)):
        if upto is not None and i > upto.message:
            break
        kept = bl if upto is None or i < upto.message else bl[: upto.block + 1]
        msgs.append({"role": role, "content": "".join(t for t, _ in kept)})
    return list(engine.render_chat(msgs))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def ttl_segments(engine: Engine, roles: list[str], blocks: list[list[tuple[str, float | None]]],
                 prompt: list[int], top_level: float | None) -> list[tuple[int, float]]:
    points = [Breakpoint(i, j, ttl) for i, bl in enumerate(blocks)
              for j, (_, ttl) in enumerate(bl) if ttl is not None]
    if len(points) + (top_level is not None) > MAX_BREAKPOINTS:
        raise bad_request(f"At most {MAX_BREAKPOINTS} cache_control breakpoints are allowed.")
    segments = [(_common_prefix(_render(engine, roles, blocks, p), prompt), p.ttl_s)
                for p in points]
    if top_level is not None:
        segments.append((len(prompt), top_level))
    return sorted(segments)


@dataclass
class _Prepared:
    """A request ready for the engine: what ``prepare`` builds from the body."""

    model: str
    stream: bool
    prompt: list[int]
    sampling: SamplingParams
    segments: list[tuple[int, float]]


def _prepare(state: AppState, body: dict) -> _Prepared:
    """Validation, chat template and tokenizing (breakpoints included); may run on a worker
    thread (``prepare``)."""
    model = field(body, "model", str, required=True)
    max_tokens = field(body, "max_tokens", int, required=True)
    stream = field(body, "stream", bool, default=False)
    roles, blocks = parse_conversation(body)
    reject(body, _UNSUPPORTED)
    top_level = _ttl(body.get("cache_control"), "cache_control")
    check_model(state, model)
    prompt = _render(state.engine, roles, blocks)
    budget = token_budget(state, len(prompt), max_tokens, "max_tokens")
    top_k = field(body, "top_k", int, default=0)
    if top_k < 0:
        raise bad_request("'top_k' must be >= 0.")
    sampling = SamplingParams(
        max_tokens=budget, temperature=number(body, "temperature", 0.0, 1.0, 1.0),
        top_p=number(body, "top_p", 0.0, 1.0, 1.0), top_k=top_k,
        stop=stop_list(body, "stop_sequences", max_items=16))
    segments = ttl_segments(state.engine, roles, blocks, prompt, top_level)
    return _Prepared(model, stream, prompt, sampling, segments)


@admitted
async def messages(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    p = await prepare(await read_body(request), lambda body: _prepare(state, body))
    model, stream, prompt, sampling, segments = (p.model, p.stream, p.prompt, p.sampling,
                                                 p.segments)
    async with Generation(request, "messages", model, prompt, sampling, segments) as gen:
        if stream:
            return await _stream(request, gen)
        text = await gen.run()
        assert gen.usage is not None
        return web.json_response({**_message(gen, [{"type": "text", "text": text}]),
                                  "stop_reason": _stop_reason(gen),
                                  "stop_sequence": gen.stop_sequence,
                                  "usage": anthropic_usage(gen.usage)})


def _message(gen: Generation, content: list) -> dict:
    return {"id": "msg_" + gen.request_id[4:], "type": "message", "role": "assistant",
            "model": gen.model, "content": content, "stop_reason": None,
            "stop_sequence": None}


async def _stream(request: web.Request, gen: Generation) -> web.StreamResponse:
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
        await send(resp, {"type": "content_block_start", "index": 0,
                          "content_block": {"type": "text", "text": ""}}, "content_block_start")
        await send(resp, {"type": "ping"}, "ping")
        while piece is not None:
            await send(resp, {"type": "content_block_delta", "index": 0,
                              "delta": {"type": "text_delta", "text": piece}},
                       "content_block_delta")
            piece = await anext(pieces, None)
        assert gen.usage is not None  # billed before the closing events
        await send(resp, {"type": "content_block_stop", "index": 0}, "content_block_stop")
        await send(resp, {"type": "message_delta",
                          "delta": {"stop_reason": _stop_reason(gen),
                                    "stop_sequence": gen.stop_sequence},
                          "usage": anthropic_usage(gen.usage)}, "message_delta")
        await send(resp, {"type": "message_stop"}, "message_stop")
        await resp.write_eof()
    except ClientGone:
        pass
    return resp
