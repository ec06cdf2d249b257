"""``POST /v1/completions``: one prompt or a list of them (strings or token-id lists),
``n`` samples of each, ``echo``, ``logprobs``, streamed or not.

Prompt ``k``'s samples are choices ``k * n .. k * n + n - 1``. The whole request is one
``Generation``, billed once: every prompt counted once, the completions of all choices.
"""

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
from kvgate.gateway.http.choices import Choice
from kvgate.gateway.http.generation import Generation
from kvgate.gateway.http.openai.chat import end_stream
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.http.validation import check_model, encode, token_budget
from kvgate.gateway.protocol.body import field
from kvgate.gateway.protocol.cache_request import CacheRequest, openai_cache_request
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.openai_chat import common_fields, openai_usage
from kvgate.gateway.protocol.params import completion_logprobs, model_defaults, sampling_from
from kvgate.gateway.protocol.priority import priority_of
from kvgate.gateway.protocol.structured_outputs import structured_output

MAX_PROMPTS = 64  # prompts in one request (evaluation harnesses batch them)
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


class _Prepared(NamedTuple):
    model: str
    stream: bool
    include_usage: bool
    echo: bool
    prompts: list[list[int]]
    sampling: SamplingParams
    cache: CacheRequest
    priority: int = 0
    max_tokens_given: bool = True


def _token_ids(state: AppState, ids: list[Any], param: str) -> list[int]:
    vocab = state.engine.tokenizer.vocab_size
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request(f"'{param}' must be a non-empty list of token ids.", param="prompt",
                          code="invalid_type")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"'{param}' holds the token id {str(bad)[:40]}; this model's "
                          f"token ids are 0 to {vocab - 1}.", param="prompt",
                          code="invalid_value")
    return list(ids)


def prompts_of(state: AppState, body: dict[str, Any]) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a token-id list, or a list of those."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("Missing required field 'prompt'.", param="prompt",
                          code="missing_field")
    if isinstance(prompt, str):
        return [encode(state.engine, prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("'prompt' must be a string, a list of strings, a list of token ids "
                          "or a list of token-id lists.", param="prompt", code="invalid_type")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [_token_ids(state, prompt, "prompt")]
    if len(prompt) > MAX_PROMPTS:
        raise bad_request(f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} per "
                          "request.", param="prompt", code="invalid_value")
    out = []
    for k, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(encode(state.engine, p))
        elif isinstance(p, list):
            out.append(_token_ids(state, p, f"prompt[{k}]"))
        else:
            raise bad_request(f"'prompt[{k}]' must be a string or a list of token ids.",
                              param="prompt", code="invalid_type")
    return out


def _prepare(state: AppState, body: dict) -> _Prepared:
    """Validation and tokenizing; may run on a worker thread (``prepare``)."""
    model, stream, include_usage = common_fields(body)
    echo = field(body, "echo", bool, default=False)
    prompts = prompts_of(state, body)
    model = check_model(state, model)
    requested = field(body, "max_tokens", int)
    budget = min(token_budget(state, len(p), requested, "max_tokens", "prompt") for p in prompts)
    sampling = sampling_from(body, budget, chat=False, vocab_size=state.engine.vocab_size,
                             defaults=model_defaults(state.engine.model_info))
    if echo and sampling.logprobs is not None:
        raise bad_request("'echo' with 'logprobs' would need the prompt's log probabilities, "
                          "which this server does not compute; send one or the other.",
                          param="echo", code="unsupported_parameter")
    sequences = len(prompts) * sampling.n
    if sequences > state.settings.engine.max_running:  # one request must not take every slot
        raise bad_request(f"{len(prompts)} prompts x n={sampling.n} is {sequences} sequences; "
                          f"one request may run at most {state.settings.engine.max_running}.",
                          param="n", code="invalid_value")
    sampling.structured = structured_output(state.engine.grammars, body, chat=False)
    return _Prepared(model, stream, include_usage, echo, prompts, sampling,
                     openai_cache_request(body), priority_of(body), requested is not None)


@admitted
async def completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    p = await prepare(await read_body(request), lambda body: _prepare(state, body))
    echoed = [state.engine.tokenizer.decode(ids) if p.echo else "" for ids in p.prompts]
    async with Generation(request, "completions", p.model, p.prompts[0], p.sampling,
                          more_prompts=p.prompts[1:], cache=p.cache, priority=p.priority,
                          max_tokens_param="max_tokens" if p.max_tokens_given else None
                          ) as gen:
        if p.stream:
            return await _stream(request, gen, p.include_usage, echoed)
        await gen.run()
        assert gen.usage is not None
        return web.json_response({
            "id": "cmpl-" + gen.request_id[4:], "object": "text_completion",
            "created": int(time.time()), "model": p.model,
            "choices": [_choice(state, gen, c, echoed) for c in gen.choices.items],
            "usage": openai_usage(gen.usage), "receipt_id": gen.receipt_id})


def _choice(state: AppState, gen: Generation, c: Choice, echoed: list[str]) -> dict[str, Any]:
    prefix = echoed[c.index // gen.sampling.n]
    logprobs = None
    if gen.sampling.logprobs is not None:
        logprobs = completion_logprobs(state.engine.tokenizer, c.logprobs, len(prefix))
    return {"index": c.index, "text": prefix + c.text, "logprobs": logprobs,
            "finish_reason": _FINISH.get(c.finish_reason or "stop", "stop")}


async def _stream(request: web.Request, gen: Generation, include_usage: bool,
                  echoed: list[str]) -> web.StreamResponse:
    """Chunks as the SDK expects; the first engine event arrives before the headers, so
    engine errors (prompt too long, overloaded) still get a proper status code."""
    state = state_of(request)
    base: dict[str, Any] = {"id": "cmpl-" + gen.request_id[4:], "object": "text_completion",
                            "created": int(time.time()), "model": gen.model}
    if include_usage:
        base["usage"] = None
    offsets = [len(echoed[c.index // gen.sampling.n]) for c in gen.choices.items]

    def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": finish}]}

    events = gen.events()
    ev = await anext(events, None)
    ctx_of(request).engine_s = gen.elapsed_s()
    resp = await open_stream(request)
    try:
        for c in gen.choices.items:
            if echoed[c.index // gen.sampling.n]:
                await send(resp, chunk(c.index, echoed[c.index // gen.sampling.n]))
        while ev is not None:
            logprobs = None
            if gen.sampling.logprobs is not None and ev.logprobs:
                logprobs = completion_logprobs(state.engine.tokenizer, ev.logprobs,
                                               offsets[ev.index])
            if ev.text or logprobs is not None:
                await send(resp, chunk(ev.index, ev.text, logprobs))
            offsets[ev.index] += len(ev.text)
            ev = await anext(events, None)
        for c in gen.choices.items:
            await send(resp, chunk(c.index, "", None,
                                   _FINISH.get(c.finish_reason or "stop", "stop")))
        await end_stream(resp, base, gen, include_usage)
    except ClientGone:
        pass
    return resp
