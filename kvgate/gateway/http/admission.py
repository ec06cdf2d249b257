"""Admission before work: a generating handler is admitted before it reads its body.

``@admitted`` takes the tenant's request-rate, concurrency and gateway-capacity checks
(``Limiter.enter``) before the handler runs, so a tenant over its limits is turned away
without the gateway reading, parsing, rendering or tokenizing its prompt; the slot is held
until the handler returns. ``charge`` adds the token-based check once the prompt is
tokenized (prompt plus most output, settled at the bill: ``limits``). Every refusal is counted in ``kvgate_admission_rejected_total``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvgate.gateway.edge.context import principal_of
from kvgate.gateway.http.limits import Rejected, Ticket
from kvgate.gateway.http.state import state_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TICKET = web.RequestKey("kvgate_ticket", Ticket)


def admitted(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def admit_first(request: web.Request) -> web.StreamResponse:
        try:
            ticket = state_of(request).limiter.enter(principal_of(request))
        except Rejected as exc:
            _count(request, exc)
            raise
        request[TICKET] = ticket
        try:
            return await handler(request)
        finally:
            ticket.release()

    return admit_first


def charge(request: web.Request, prompt_tokens: int, max_output: int = 0, outputs: int = 1,
           max_tokens_param: str | None = "max_tokens") -> tuple[Ticket, int]:
    """The request's ticket, charged with its prompt and its most output (the
    tokens-per-minute check, ``Ticket.charge``), and the output bound each of its
    ``outputs`` may use; a request not admitted by ``@admitted`` is admitted here.
    ``max_tokens_param``: the field that set ``max_output``, None when the request named
    none (its output is then cut to what the tenant's minute has left, not refused)."""
    ticket: Ticket | None = request.get(TICKET)
    created = ticket is None
    try:
        if ticket is None:
            ticket = state_of(request).limiter.enter(principal_of(request))
        granted = ticket.charge(prompt_tokens, max_output, outputs,
                                flexible=max_tokens_param is None,
                                param=max_tokens_param or "max_tokens")
    except Rejected as exc:
        if created and ticket is not None:
            ticket.release()
        _count(request, exc)
        raise
    return ticket, granted


def _count(request: web.Request, exc: Rejected) -> None:
    m = state_of(request).metrics
    m.admission_rejected.labels(exc.reason, m.tenant(principal_of(request).tenant_id)).inc()
