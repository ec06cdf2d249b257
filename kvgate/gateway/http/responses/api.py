"""The OpenAI Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A response is generated and billed like a chat completion (``Generation``, endpoint
``responses``). With ``store`` (the default) it is kept per tenant in the ledger database
(``kvgate.gateway.ledger.responses``) until ``--response-ttl-seconds`` passes, so it can be read
back and continued with ``previous_response_id``: the stored conversation plus the new
input, rendered again, whose prefix is exactly what the earlier request computed (see
``responses_items``), so the prefix cache serves the whole earlier conversation.

Function tools (``tools`` of type ``function``, ``tool_choice``, ``parallel_tool_calls``)
are the chat API's (``openai_tools``: the template with tools, forced calls by grammar)
in the Responses shape: the answer's calls are ``function_call`` output items (``_Output``,
streamed as ``response.function_call_arguments.delta`` / ``.done``), and
``function_call`` / ``function_call_output`` input items are the history's calls and
results (``responses_items``).

Storage is best effort *after* generating: the tokens are billed through the ledger's own
path (which spools while the database is away), and an answer that could not be stored is
still returned, as if ``store`` had been false; the failure is logged and the id then reads
as unknown (404). Reading a ``previous_response_id`` while the database is away is a 503
before anything is generated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time
from typing import Any, NamedTuple

from aiohttp import web

from kvgate.gateway.edge.body import OFFLOAD_BYTES, prepare, read_body
from kvgate.gateway.edge.context import ctx_of, principal_of
from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.edge.sse import open_stream, send
from kvgate.gateway.engine import SamplingParams
from kvgate.gateway.http.admission import admitted
from kvgate.gateway.http.caches.named import named_cache, pin_named
from kvgate.gateway.http.generation import Generation
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.http.validation import check_model, token_budget
from kvgate.gateway.ledger import LedgerUnavailable
from kvgate.gateway.ledger.responses import ResponseStore, Stored
from kvgate.gateway.protocol import responses_items as items
from kvgate.gateway.protocol.body import field, number, reject
from kvgate.gateway.protocol.cache_request import CacheRequest, openai_cache_request
from kvgate.gateway.protocol.errors import ApiError, bad_request
from kvgate.gateway.protocol.openai_tools import (
    ToolRequest,
    forced_sampling,
    render_prompt,
    tool_request,
)
from kvgate.gateway.protocol.params import default_temperature, model_defaults
from kvgate.gateway.protocol.priority import priority_of
from kvgate.gateway.protocol.tool_parsers import Delta, ToolCallDelta
from kvgate.gateway.usage import Usage

log = logging.getLogger("kvgate.http")

STORE = web.AppKey("kvgate_response_store", dict)  # {"store": ResponseStore}, made lazily
_UNSUPPORTED = {
    "background": "background responses are not implemented",
    "conversation": "conversation objects are not implemented; use previous_response_id",
    "include": "extra output data is not implemented",
    "prompt": "prompt templates are not implemented",
    "reasoning": "this model has no reasoning settings",
    "top_logprobs": "log probabilities are not returned on /v1/responses",
    "max_tool_calls": "built-in tools (the calls max_tool_calls counts) are not available",
}
_METADATA_KEYS, _METADATA_KEY_CHARS, _METADATA_VALUE_CHARS = 16, 64, 512
Event = tuple[str, dict[str, Any]]  # (stream event type, its fields)


def setup(app: web.Application) -> None:
    app[STORE] = {}


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/responses", create),
            web.get("/v1/responses/{id}", retrieve, allow_head=False),
            web.delete("/v1/responses/{id}", remove)]


def store_of(request: web.Request) -> ResponseStore:
    state = state_of(request)
    holder: dict[str, ResponseStore] = request.app[STORE]
    if "store" not in holder:
        holder["store"] = ResponseStore(state.ledger, float(state.settings.ledger.response_ttl_seconds))
    return holder["store"]


def _unavailable(exc: LedgerUnavailable) -> ApiError:
    log.warning("response store: %s", exc)
    return ApiError(503, "Stored responses cannot be read now: the database is unavailable. "
                    "Retry shortly.", code="ledger_unavailable", retry_after=5.0)


def _not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"Response with id '{response_id[:80]}' not found (it may have "
                    "expired, been deleted, or not been stored).", param=param,
                    code="response_not_found")


async def _lookup(request: web.Request, response_id: str, param: str | None) -> Stored:
    tenant = principal_of(request).tenant_id
    assert tenant is not None  # the auth middleware lets only tenant keys through
    try:
        stored = await store_of(request).get(tenant, response_id)
    except LedgerUnavailable as exc:
        raise _unavailable(exc) from None
    if stored is None:
        raise _not_found(response_id, param)
    return stored


async def retrieve(request: web.Request) -> web.Response:
    if request.query.get("stream", "false").lower() not in ("false", "0"):
        raise bad_request("Replaying a stored response as a stream is not supported.",
                          param="stream", code="unsupported_parameter")
    stored = await _lookup(request, request.match_info["id"], None)
    return web.json_response(stored.response)


async def remove(request: web.Request) -> web.Response:
    response_id = request.match_info["id"]
    tenant = principal_of(request).tenant_id
    assert tenant is not None
    try:
        deleted = await store_of(request).delete(tenant, response_id)
    except LedgerUnavailable as exc:
        raise _unavailable(exc) from None
    if not deleted:
        raise _not_found(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


# -- the request -----------------------------------------------------------------------------


class _Prepared(NamedTuple):
    model: str
    stream: bool
    store: bool
    prompt: list[int]
    history: list[items.Turn]  # the conversation before this response's output
    sampling: SamplingParams
    tools: ToolRequest
    echo: dict[str, Any]  # request settings the response object repeats
    cache: CacheRequest
    priority: int = 0
    max_tokens_given: bool = True


def _metadata(body: dict) -> dict[str, str]:
    meta = field(body, "metadata", dict, default={})
    ok = len(meta) <= _METADATA_KEYS and all(
        isinstance(k, str) and len(k) <= _METADATA_KEY_CHARS and isinstance(v, str)
        and len(v) <= _METADATA_VALUE_CHARS for k, v in meta.items())
    if not ok:
        raise bad_request(f"'metadata' holds at most {_METADATA_KEYS} string values, keys up "
                          f"to {_METADATA_KEY_CHARS} and values up to {_METADATA_VALUE_CHARS} "
                          "characters.", param="metadata", code="invalid_value")
    return dict(meta)


def _text_format(body: dict, sampling: SamplingParams) -> tuple[dict, SamplingParams]:
    """``text.format``: text, or JSON (json_object / json_schema) enforced by the engine's
    grammar (``kvgate.gateway.engine.structured``)."""
    text = field(body, "text", dict, default={})
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                             "json_schema"):
        raise bad_request("'text.format.type' must be 'text', 'json_object' or 'json_schema'.",
                          param="text.format", code="invalid_value")
    if fmt["type"] == "text":
        return {"format": {"type": "text"}}, sampling
    try:
        structured = importlib.import_module("kvgate.gateway.engine.structured")
    except ImportError:
        raise bad_request("Structured output ('text.format' json_object / json_schema) is "
                          "not available on this server.", param="text.format",
                          code="unsupported_parameter") from None
    if fmt["type"] == "json_object":
        spec = structured.StructuredSpec("json_object", "")
        echo: dict[str, Any] = {"type": "json_object"}
    else:
        name, schema = fmt.get("name"), fmt.get("schema")
        strict = fmt.get("strict")
        if not isinstance(name, str) or not name or not isinstance(schema, dict) \
                or not isinstance(strict, (bool, type(None))):
            raise bad_request("'text.format' json_schema needs 'name' (a string) and 'schema' "
                              "(an object); 'strict' is a boolean.", param="text.format",
                              code="invalid_value")
        spec = structured.json_schema_spec(schema, bool(strict))
        echo = {"type": "json_schema", "name": name, "schema": schema, "strict": bool(strict)}
        if isinstance(fmt.get("description"), str):
            echo["description"] = fmt["description"]
    return {"format": echo}, dataclasses.replace(sampling, **{"structured": spec})


def _function_tools(body: dict) -> list[dict[str, Any]]:
    """``tools`` (the Responses shape: ``{type, name, description, parameters, strict}``)
    as the chat API's function tools; any other tool type is a 400 naming it."""
    tools = field(body, "tools", list, default=[])
    out = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"'{param}' must be an object.", param=param, code="invalid_type")
        kind = tool.get("type")
        if kind != "function":
            raise bad_request(f"'{param}.type' is {str(kind)[:40]!r}: this server has no "
                              "built-in tools; only 'function' tools are supported.",
                              param=f"{param}.type", code="unsupported_value")
        out.append({"type": "function", "function": {
            k: tool[k] for k in ("name", "description", "parameters", "strict")
            if tool.get(k) is not None}})
    return out


def _tool_choice(raw: Any) -> Any:
    """``tool_choice`` in the chat API's shape."""
    if raw is None or raw in ("none", "auto", "required"):
        return raw
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "function" and isinstance(raw.get("name"), str):
        return {"type": "function", "function": {"name": raw["name"]}}
    if isinstance(kind, str) and kind != "function":
        raise bad_request(f"'tool_choice' of type {kind[:40]!r} is not supported: this server "
                          "has no built-in tools.", param="tool_choice",
                          code="unsupported_value")
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"name\": ...}.", param="tool_choice",
                      code="invalid_value")


def _tools(state: AppState, body: dict) -> tuple[ToolRequest, dict[str, Any]]:
    """The request's function tools (``openai_tools``, whose checks name the chat shape's
    fields, renamed here), and how the response repeats them."""
    chat = {"tools": _function_tools(body), "tool_choice": _tool_choice(body.get("tool_choice")),
            "parallel_tool_calls": body.get("parallel_tool_calls")}
    try:
        req = tool_request(chat, state.tool_parser)
    except ApiError as exc:
        exc.param = exc.param and exc.param.replace(".function.", ".")
        exc.message = exc.message.replace(".function.", ".")
        raise
    choice = body.get("tool_choice") or "auto"
    if isinstance(choice, dict):
        choice = {"type": "function", "name": choice["name"]}
    echo = {"tools": items.response_tools(req.tools), "tool_choice": choice,
            "parallel_tool_calls": field(body, "parallel_tool_calls", bool, default=True)}
    return req, echo


def _prepare(state: AppState, body: dict, previous: Stored | None) -> _Prepared:
    """Validation, template and tokenizing; may run on a worker thread."""
    model = check_model(state, field(body, "model", str, required=True))
    reject(body, _UNSUPPORTED)
    tools, tools_echo = _tools(state, body)
    truncation = field(body, "truncation", str, default="disabled")
    if truncation != "disabled":
        raise bad_request("Only 'truncation': 'disabled' is supported: a conversation that "
                          "does not fit is refused, never cut.", param="truncation",
                          code="unsupported_parameter")
    stream = field(body, "stream", bool, default=False)
    store = field(body, "store", bool, default=True)
    instructions = field(body, "instructions", str)
    metadata = _metadata(body)
    earlier = previous.conversation if previous else []
    history = [*earlier, *items.input_turns(body.get("input"), earlier)]
    system = [{"role": "system", "content": instructions}] if instructions else []
    try:
        prompt = items.render(state.engine.tokenizer, [*system, *history],
                              lambda turns: render_prompt(state.engine, turns, tools.tools))
    except ApiError as exc:  # the template refused the conversation
        exc.param = "input" if exc.param == "messages" else exc.param
        raise
    requested = field(body, "max_output_tokens", int)
    budget = token_budget(state, len(prompt), requested, "max_output_tokens", "input")
    defaults = model_defaults(state.engine.model_info)
    temperature = number(body, "temperature", 0.0, 2.0, default_temperature(body, defaults))
    top_p = number(body, "top_p", 0.0, 1.0, defaults.get("top_p", 1.0))
    sampling = SamplingParams(max_tokens=budget, temperature=temperature, top_p=top_p,
                              top_k=int(defaults.get("top_k", 0)))
    text, sampling = _text_format(body, sampling)
    sampling = forced_sampling(state.engine.grammars, tools, sampling)
    echo = {**tools_echo, "instructions": instructions, "metadata": metadata, "temperature": temperature,
            "top_p": top_p, "max_output_tokens": field(body, "max_output_tokens", int),
            "previous_response_id": previous.id if previous else None, "text": text}
    return _Prepared(model, stream, store, prompt, history, sampling, tools, echo,
                     openai_cache_request(body), priority_of(body), requested is not None)


@admitted
async def create(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    raw = await read_body(request)
    parsed, named = await named_cache(request, raw, "responses")
    body = await prepare(parsed, lambda parsed: parsed)
    previous = None
    prev_id = field(body, "previous_response_id", str)
    if prev_id is not None:
        previous = await _lookup(request, prev_id, "previous_response_id")
    if len(raw) > OFFLOAD_BYTES:
        prep = await asyncio.to_thread(_prepare, state, body, previous)
    else:
        prep = _prepare(state, body, previous)
    await pin_named(request, named, prep.prompt)
    reply = _Reply(request, prep)
    async with Generation(request, "responses", prep.model, prep.prompt, prep.sampling,
                          cache=prep.cache, priority=prep.priority,
                          max_tokens_param="max_output_tokens" if prep.max_tokens_given
                          else None) as gen:
        if prep.stream:
            return await reply.stream(gen)
        output = _Output(prep.tools)
        output.feed(await gen.run())
        response, _ = await reply.finish(gen, output)
        return web.json_response(response)


# -- the answer ------------------------------------------------------------------------------


def responses_usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens,
                                     "cache_write_tokens": u.cache_write_tokens},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


class _Output:
    """The answer's output items as its text arrives, and the stream events that tell
    them: a ``message`` item for text, a ``function_call`` item per call (``ToolStream``
    reads them from the text; text after a call opens a new message item). A non-streamed
    answer runs the same steps and drops the events, so a streamed answer reassembles to
    exactly the non-streamed one."""

    def __init__(self, tools: ToolRequest) -> None:
        self.tools = tools
        self.reader = tools.stream()
        self.items: list[dict[str, Any]] = []
        self.text: list[str] | None = None  # the open message item's text (None: none open)
        self.dropped = False  # parallel_tool_calls false left a call out

    def feed(self, text: str) -> list[Event]:
        return self._events(self.reader.feed(text))

    def finish(self, status: str) -> list[Event]:
        """The last events; ``status`` is the last message item's (at least one item)."""
        events = self._events(self.reader.finish())
        if not self.items:
            events += self._open()
        return events + self._close(status)

    def _events(self, deltas: list[Delta]) -> list[Event]:
        out: list[Event] = []
        for d in deltas:
            if isinstance(d, ToolCallDelta):
                if self.tools.parallel or d.index == 0:
                    out += self._close("completed") + self._call(d)
                else:
                    self.dropped = True
                continue
            if self.text is None:
                out += self._open()
            assert self.text is not None
            self.text.append(d)
            out.append(("response.output_text.delta", {**self._where(), "delta": d,
                                                       "logprobs": []}))
        return out

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1,
                "content_index": 0}

    def _open(self) -> list[Event]:
        item = items.message_item(items.new_id("msg"), "", "in_progress")
        self.items.append(item)
        self.text = []
        return [("response.output_item.added", {"output_index": len(self.items) - 1,
                                                "item": item}),
                ("response.content_part.added", {**self._where(),
                                                 "part": items.text_part("")})]

    def _close(self, status: str) -> list[Event]:
        if self.text is None:
            return []
        text, where = "".join(self.text), self._where()
        self.text = None
        item = self.items[-1] = items.message_item(where["item_id"], text, status)
        return [("response.output_text.done", {**where, "text": text, "logprobs": []}),
                ("response.content_part.done", {**where, "part": items.text_part(text)}),
                ("response.output_item.done", {"output_index": where["output_index"],
                                               "item": item})]

    def _call(self, d: ToolCallDelta) -> list[Event]:
        c, item_id, index = d.call, items.new_id("fc"), len(self.items)
        item = items.function_call_item(item_id, c.id, c.name, c.arguments, "completed")
        self.items.append(item)
        where = {"item_id": item_id, "output_index": index}
        return [("response.output_item.added", {"output_index": index, "item": {
                    **item, "arguments": "", "status": "in_progress"}}),
                ("response.function_call_arguments.delta", {**where, "delta": c.arguments}),
                ("response.function_call_arguments.done", {**where, "name": c.name,
                                                           "arguments": c.arguments}),
                ("response.output_item.done", {"output_index": index, "item": item})]


class _Reply:
    """The response object as it grows, and the stored record it becomes."""

    def __init__(self, request: web.Request, prep: _Prepared) -> None:
        self.request = request
        self.prep = prep
        self.id = "resp_" + ctx_of(request).request_id[4:]
        self.created = int(time.time())
        self.seq = 0

    def body(self, status: str, output: list[dict[str, Any]], usage: Usage | None,
             incomplete: bool = False, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "model": self.prep.model, "output": output, "truncation": "disabled",
            **({"usage": responses_usage(usage)} if usage is not None else {}),
            **self.prep.echo}

    async def finish(self, gen: Generation, output: _Output) -> tuple[dict[str, Any],
                                                                      list[Event]]:
        """The final object, stored first when asked (see the module's docstring), and the
        output's last stream events."""
        assert gen.usage is not None
        incomplete = gen.finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        events = output.finish(status)
        response = self.body(status, output.items, gen.usage, incomplete)
        if self.prep.store:
            state = state_of(self.request)
            turn = items.assistant_turn(output.items)
            if not output.dropped:  # the sampled ids hold exactly the kept calls
                turn["ids"] = items.generated_ids(state.engine.tokenizer, gen.output_ids)
            tenant = principal_of(self.request).tenant_id
            assert tenant is not None
            try:
                await store_of(self.request).put(tenant, self.id, response,
                                                 [*self.prep.history, turn])
            except LedgerUnavailable as exc:
                log.warning("response %s was answered but not stored: %s", self.id, exc)
        return response, events

    async def _send(self, resp: web.StreamResponse, kind: str, **data: Any) -> None:
        await send(resp, {"type": kind, "sequence_number": self.seq, **data}, event=kind)
        self.seq += 1

    async def stream(self, gen: Generation) -> web.StreamResponse:
        """The event sequence the SDK consumes; the first engine event arrives before the
        headers, so engine errors (prompt too long, overloaded) keep their status code. A
        failure after the first byte ends the stream with ``response.failed``."""
        pieces = gen.stream()
        piece = await anext(pieces, None)
        ctx_of(self.request).engine_s = gen.elapsed_s()
        resp = await open_stream(self.request)
        output = _Output(self.prep.tools)
        try:
            await self._send(resp, "response.created",
                             response=self.body("in_progress", [], None))
            await self._send(resp, "response.in_progress",
                             response=self.body("in_progress", [], None))
            try:
                while piece is not None:
                    for kind, data in output.feed(piece):
                        await self._send(resp, kind, **data)
                    piece = await anext(pieces, None)
            except (ClientGone, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.exception("response %s failed mid-stream", self.id)
                error = {"code": "server_error",
                         "message": f"The response failed: {type(exc).__name__} (request id "
                                    f"{ctx_of(self.request).public_id})."}
                await self._send(resp, "response.failed",
                                 response=self.body("failed", [], gen.usage, error=error))
                resp.force_close()
                await resp.write_eof()
                return resp
            final, events = await self.finish(gen, output)
            for kind, data in events:
                await self._send(resp, kind, **data)
            kind = "response.completed" if final["status"] == "completed" \
                else "response.incomplete"
            await self._send(resp, kind, response=final)
            await resp.write_eof()
        except ClientGone:
            pass
        return resp
