"""The model this server serves, under the names clients may use for it.

``--served-model-name a,b`` (vLLM's flag) makes ``a`` and ``b`` both valid in ``model``
fields; ``a``, the first, is the one reported: in ``/v1/models``, in responses and in the
ledger, so one model's usage is never split across its aliases. Without the flag the model
is served under its own id.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.protocol.errors import ApiError


def served_names(state: AppState) -> list[str]:
    names = [n.strip() for n in state.settings.engine.served_model_name.split(",") if n.strip()]
    return names or [state.engine.model_id]


def resolve_model(state: AppState, name: str) -> str | None:
    """The reported name of the model ``name`` refers to, or None when it is not served."""
    names = served_names(state)
    return names[0] if name in names else None


def max_model_len(state: AppState) -> int:
    """Prompt plus output, in tokens: the model's context capped by ``--max-model-len``."""
    return int(state.engine.model_info["context_length"])


def model_card(state: AppState) -> dict[str, Any]:
    """An OpenAI Model object, with vLLM's ``max_model_len``."""
    card: dict[str, Any] = {"id": served_names(state)[0], "object": "model",
                            "created": int(state.started), "owned_by": "kvgate",
                            "max_model_len": max_model_len(state)}
    note = state.engine.model_info.get("note")
    if note:  # the demo model says plainly that its text is meaningless
        card["note"] = note
    return card


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [model_card(state_of(request))]})


async def retrieve_model(request: web.Request) -> web.Response:
    state = state_of(request)
    name = request.match_info["model"]
    if resolve_model(state, name) is None:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves "
                       f"'{served_names(state)[0]}' (see /v1/models).", param="model",
                       code="model_not_found")
    return web.json_response(model_card(state))
