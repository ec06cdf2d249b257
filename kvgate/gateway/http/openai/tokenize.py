"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes.

The ids are the ones a generating request would send to the engine: a ``prompt`` is
tokenized as ``/v1/completions`` tokenizes it (no special tokens unless
``add_special_tokens``; vLLM adds them by default, but our completions do not), and
``messages`` (with ``tools``) go through the chat template as ``/v1/chat/completions``
renders them. Tenant keys only; nothing is generated or billed.
"""

from __future__ import annotations

from aiohttp import web

from kvgate.gateway.edge.body import prepare, read_body
from kvgate.gateway.http.admission import admitted
from kvgate.gateway.http.openai.models import max_model_len
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.http.validation import check_model
from kvgate.gateway.protocol.body import field
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.openai_chat import chat_messages
from kvgate.gateway.protocol.openai_tools import tool_request

_UNSUPPORTED_CHAT = {"add_generation_prompt": False, "continue_final_message": True}


def _tokenize(state: AppState, body: dict) -> dict:
    model = field(body, "model", str)
    if model is not None:
        check_model(state, model)
    if "messages" in body and "prompt" in body:
        raise bad_request("Send either 'prompt' or 'messages', not both.", param="prompt",
                          code="invalid_value")
    engine = state.engine
    if "messages" in body:
        for name, value in _UNSUPPORTED_CHAT.items():
            if body.get(name, not value) == value:
                raise bad_request(f"'{name}': {str(value).lower()} is not supported; the "
                                  "template is rendered as a chat request renders it.",
                                  param=name, code="unsupported_parameter")
        tools = tool_request(body, state.tool_parser).tools  # rendered with the messages, as chat does
        tokens = engine.render_chat(chat_messages(body), tools=tools or None)
    else:
        prompt = field(body, "prompt", str, required=True)
        special = field(body, "add_special_tokens", bool, default=False)
        tokens = engine.tokenizer.encode(prompt, add_special_tokens=special)
    return {"count": len(tokens), "max_model_len": max_model_len(state), "tokens": tokens}


@admitted  # the tenant's request rate and concurrency apply: unbilled, not free
async def tokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    out = await prepare(await read_body(request), lambda body: _tokenize(state, body))
    return web.json_response(out)


def _detokenize(state: AppState, body: dict) -> dict:
    model = field(body, "model", str)
    if model is not None:
        check_model(state, model)
    tokens = field(body, "tokens", list, required=True)
    vocab = state.engine.tokenizer.vocab_size
    for i, t in enumerate(tokens):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise bad_request(f"'tokens[{i}]' is {str(t)[:40]}; this model's token ids are "
                              f"integers from 0 to {vocab - 1}.", param="tokens",
                              code="invalid_value")
    return {"prompt": state.engine.tokenizer.decode(tokens, skip_special_tokens=False)}


@admitted  # the tenant's request rate and concurrency apply: unbilled, not free
async def detokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    out = await prepare(await read_body(request), lambda body: _detokenize(state, body))
    return web.json_response(out)
