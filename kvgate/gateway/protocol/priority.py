"""What a request asks of the engine's scheduler, and what its tenant may ask.

- ``priority``: vLLM's request field (an integer, lower runs first, default 0), accepted
  on /v1/chat/completions, /v1/completions, /v1/responses and /v1/messages (the SDKs send
  it through ``extra_body``). Within ``MIN_PRIORITY``..``MAX_PRIORITY``, and not below the
  tenant's ``min_priority`` (default 0): a tenant jumps ahead of the default class only if
  the operator lets it. Anything else is a 400 naming ``priority``.
- The tenant's scheduling account (``GenerateRequest.tenant``, its id), its plan's
  ``scheduling_weight`` and its cap on running sequences (``max_running_sequences``, none
  by default) go to the engine with every request (``engine/fairness.py`` acts on them).
"""

from __future__ import annotations

from typing import Any

from kvgate.gateway.ledger import Principal
from kvgate.gateway.protocol.body import integer
from kvgate.gateway.protocol.errors import bad_request

MIN_PRIORITY, MAX_PRIORITY = -1000, 1000


def priority_of(body: dict[str, Any]) -> int:
    """The body's ``priority`` (0 when absent or null); a 400 naming it when it is not an
    integer (a boolean or 1.5 is not) or is outside ``MIN_PRIORITY``..``MAX_PRIORITY``."""
    value = integer(body, "priority", MIN_PRIORITY, MAX_PRIORITY, 0)
    assert value is not None
    return value


def check_priority(principal: Principal, priority: int) -> None:
    """A 400 naming ``priority`` when it is below what the tenant may ask for."""
    floor = principal.min_priority
    if priority < floor:
        raise bad_request(f"'priority' is {priority}, but this tenant's requests may ask for "
                          f"{floor} at the lowest (lower runs first).", param="priority",
                          code="invalid_value")


def engine_terms(principal: Principal) -> dict[str, Any]:
    """``GenerateRequest``'s scheduling fields (all but the priority) for this tenant."""
    return {"tenant": str(principal.tenant_id),
            "weight": float(principal.scheduling_weight),
            "max_running": principal.max_running_sequences or 0}
