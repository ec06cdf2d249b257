"""Admission before work: a generating handler is admitted before it reads its body.

``@admitted`` takes the tenant's request-rate, concurrency and gateway-capacity checks
(``Limiter.enter``) before the handler runs, so a tenant over its limits is turned away
without the gateway reading, parsing, rendering or tokenizing its prompt; the slot is held
until the handler returns. ``charge`` adds the token-based check once the prompt is
tokenized. Every refusal is counted in ``kvgate_admission_rejected_total``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvgate.gateway.http.limits import Rejected, Ticket
from kvgate.gateway.http.state import principal_of, state_of

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


def charge(request: web.Request, prompt_tokens: int) -> Ticket:
    """The request's ticket, charged with its prompt (tokens-per-minute check); a request
    not admitted by ``@admitted`` is admitted here in one step."""
    ticket: Ticket | None = request.get(TICKET)
    try:
        if ticket is None:
            return state_of(request).limiter.admit(principal_of(request), prompt_tokens)
        ticket.charge(prompt_tokens)
    except Rejected as exc:
        _count(request, exc)
        raise
    return ticket


def _count(request: web.Request, exc: Rejected) -> None:
    m = state_of(request).metrics
    m.admission_rejected.labels(exc.reason, m.tenant(principal_of(request).tenant_id)).inc()
