"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from aiohttp import web

from gateway.engine import SamplingParams
from gateway.http.admission import admitted
from gateway.http.errors import ClientGone, bad_request
from gateway.http.generation import Generation
from gateway.http.sse import open_stream, send
from gateway.http.state import AppState, ctx_of, state_of
from gateway.http.validation import (
    INT64_MAX,
    INT64_MIN,
    check_model,
    encode,
    field,
    integer,
    number,
    prepare,
    read_body,
    reject,
    stop_list,
    token_budget,
)
from gateway.usage import Usage

_UNSUPPORTED = {
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "tools": "tool calling is not implemented",
    "tool_choice": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "logit_bias": "logit bias is not implemented",
    "frequency_penalty": "penalties are not implemented",
    "presence_penalty": "penalties are not implemented",
    "audio": "audio output is not implemented",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "web search is not implemented",
}
_COMPLETION_UNSUPPORTED = {
    **{k: _UNSUPPORTED[k] for k in ("logprobs", "logit_bias", "frequency_penalty",
                                    "presence_penalty")},
    "echo": "echoing the prompt is not implemented",
    "suffix": "insertion is not implemented",
}
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _finish(gen: Generation) -> str:
    return _FINISH.get(gen.finish_reason or "stop", "stop")


def openai_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def list_models(request: web.Request) -> web.Response:
    state = state_of(request)
    model = {"id": state.engine.model_id, "object": "model", "created": int(state.started),
             "owned_by": "kvgate"}
    info = state.engine.model_info
    if info.get("note"):  # the demo model says plainly that its text is meaningless
        model["note"] = info["note"]
    return web.json_response({"object": "list", "data": [model]})


def _content_text(content: Any, param: str, allow_none: bool) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad_request(f"'{param}' may only hold text parts "
                                  "({\"type\": \"text\", \"text\": ...}).", param=param,
                                  code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"'{param}' must be a string or a list of text parts.", param=param,
                      code="invalid_type")


def chat_messages(body: dict) -> list[dict]:
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_request("'messages' must hold at least one message.", param="messages",
                          code="empty_messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{param}' must be an object.", param=param, code="invalid_type")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"'{param}.role' must be system, developer, user or assistant "
                              f"(got {role!r}); tool messages are not supported.",
                              param=f"{param}.role", code="invalid_value")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad_request("Tool calls are not supported.", param=param,
                              code="unsupported_parameter")
        out.append({"role": role, "content": _content_text(
            m.get("content"), f"{param}.content", allow_none=role == "assistant")})
    return out


def _sampling(body: dict, max_tokens: int) -> SamplingParams:
    seed = integer(body, "seed", INT64_MIN, INT64_MAX, None)
    return SamplingParams(
        max_tokens=max_tokens, temperature=number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=number(body, "top_p", 0.0, 1.0, 1.0), seed=seed, stop=stop_list(body, "stop"))


def _common(body: dict) -> tuple[str, bool, bool]:
    model = field(body, "model", str, required=True)
    n = field(body, "n", int, default=1)
    if n != 1:
        raise bad_request("Only 'n': 1 is supported.", param="n", code="unsupported_parameter")
    stream = field(body, "stream", bool, default=False)
    options = field(body, "stream_options", dict, default={})
    include_usage = bool(stream and options.get("include_usage"))
    return model, stream, include_usage


class _Prepared(NamedTuple):
    """A request ready for the engine: what ``prepare`` builds from the body."""

    model: str
    stream: bool
    include_usage: bool
    prompt: list[int]
    sampling: SamplingParams


def _prepare_chat(state: AppState, body: dict) -> _Prepared:
    """Validation, chat template and tokenizing; may run on a worker thread (``prepare``)."""
    model, stream, include_usage = _common(body)
    messages = chat_messages(body)
    reject(body, _UNSUPPORTED)
    fmt = field(body, "response_format", dict)
    if fmt and fmt.get("type") != "text":
        raise bad_request("Only response_format {'type': 'text'} is supported.",
                          param="response_format", code="unsupported_parameter")
    check_model(state, model)
    requested = field(body, "max_completion_tokens", int)
    param = "max_completion_tokens"
    if requested is None:
        requested, param = field(body, "max_tokens", int), "max_tokens"
    prompt = state.engine.render_chat(messages)
    sampling = _sampling(body, token_budget(state, len(prompt), requested, param))
    return _Prepared(model, stream, include_usage, prompt, sampling)


@admitted
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    model, stream, include_usage, prompt, sampling = await prepare(
        await read_body(request), lambda body: _prepare_chat(state, body))
    async with Generation(request, "chat.completions", model, prompt, sampling) as gen:
        if stream:
            return await _stream(request, gen, include_usage, chat=True)
        text = await gen.run()
        assert gen.usage is not None
        return web.json_response({
            "id": "chatcmpl-" + gen.request_id[4:], "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": _finish(gen),
                         "logprobs": None,
                         "message": {"role": "assistant", "content": text, "refusal": None}}],
            "usage": openai_usage(gen.usage)})


def _prompt_ids(state: AppState, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode(state.engine, prompt)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = state.engine.tokenizer.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"'prompt' holds the token id {str(bad)[:40]}; this model's "
                              f"token ids are 0 to {vocab - 1}.", param="prompt",
                              code="invalid_value")
        return list(prompt)
    if prompt is None:
        raise bad_request("Missing required field 'prompt'.", param="prompt",
                          code="missing_field")
    raise bad_request("'prompt' must be one string or one list of token ids.", param="prompt",
                      code="invalid_type")


def _prepare_completion(state: AppState, body: dict) -> _Prepared:
    """Validation and tokenizing; may run on a worker thread (``prepare``)."""
    model, stream, include_usage = _common(body)
    reject(body, _COMPLETION_UNSUPPORTED)
    if field(body, "best_of", int, default=1) != 1:
        raise bad_request("Only 'best_of': 1 is supported.", param="best_of",
                          code="unsupported_parameter")
    prompt = _prompt_ids(state, body)
    check_model(state, model)
    max_tokens = token_budget(state, len(prompt), field(body, "max_tokens", int), "max_tokens")
    return _Prepared(model, stream, include_usage, prompt, _sampling(body, max_tokens))


@admitted
async def completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    model, stream, include_usage, prompt, sampling = await prepare(
        await read_body(request), lambda body: _prepare_completion(state, body))
    async with Generation(request, "completions", model, prompt, sampling) as gen:
        if stream:
            return await _stream(request, gen, include_usage, chat=False)
        text = await gen.run()
        assert gen.usage is not None
        return web.json_response({
            "id": "cmpl-" + gen.request_id[4:], "object": "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": _finish(gen)}],
            "usage": openai_usage(gen.usage)})


async def _stream(request: web.Request, gen: Generation, include_usage: bool,
                  chat: bool) -> web.StreamResponse:
    """Chunks as the SDK expects; the first engine event arrives before the headers, so
    engine errors (prompt too long, overloaded) still get a proper status code."""
    created = int(time.time())
    base: dict[str, Any] = {"id": ("chatcmpl-" if chat else "cmpl-") + gen.request_id[4:],
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": gen.model}
    if include_usage:
        base["usage"] = None

    def chunk(piece: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if piece is None else {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    pieces = gen.stream()
    piece = await anext(pieces, None)
    ctx_of(request).engine_s = gen.elapsed_s()
    resp = await open_stream(request)
    try:
        if chat:
            first = chunk(None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await send(resp, first)
        while piece is not None:
            await send(resp, chunk(piece, None))
            piece = await anext(pieces, None)
        assert gen.usage is not None  # billed: the ledger row exists before these bytes
        await send(resp, chunk(None, _finish(gen)))
        if include_usage:
            await send(resp, {**base, "choices": [], "usage": openai_usage(gen.usage)})
        await send(resp, "[DONE]")
        await resp.write_eof()
    except ClientGone:
        pass
    return resp
