"""Checks of a request against this replica: the model it names, the tokens it may use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvgate.gateway.http.openai.models import resolve_model, served_names
from kvgate.gateway.http.state import AppState
from kvgate.gateway.protocol.errors import ApiError, bad_request

if TYPE_CHECKING:  # the engine pulls in torch; the ledger-only CLI must not
    from kvgate.gateway.engine import EngineApi


def check_model(state: AppState, model: str, param: str = "model") -> str:
    """The name to report for ``model`` (an alias gives the first served name), or a 404."""
    reported = resolve_model(state, model)
    if reported is None:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                       f"'{served_names(state)[0]}' (see /v1/models).", param=param,
                       code="model_not_found")
    return reported


def token_budget(state: AppState, prompt_len: int, requested: int | None, param: str,
                 prompt_param: str = "messages") -> int:
    """Validate max_tokens against the context; the default fills what is left, capped.
    ``prompt_param``: the field that holds the prompt, named in its errors."""
    ctx = int(state.engine.model_info["context_length"])
    if requested is not None and requested < 1:
        raise bad_request(f"'{param}' must be at least 1.", param=param, code="invalid_value")
    if prompt_len < 1:
        raise bad_request("The prompt is empty.", param=prompt_param, code="empty_prompt")
    if prompt_len >= ctx:
        raise bad_request(f"The prompt is {prompt_len} tokens; this model's context is {ctx}.",
                          param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return min(state.settings.engine.default_max_tokens, ctx - prompt_len)
    if prompt_len + requested > ctx:
        raise bad_request(f"'{param}' is {requested} but only {ctx - prompt_len} tokens are left "
                          f"after the {prompt_len}-token prompt (context {ctx}).", param=param,
                          code="context_length_exceeded")
    return requested


def encode(engine: EngineApi, text: str) -> list[int]:
    return engine.tokenizer.encode(text)
