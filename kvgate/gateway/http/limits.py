"""Admission control: per-tenant rate limits (sliding one-minute window) and a global bound.

In memory, per process: with several replicas each enforces its share. Limits come from the
tenant's ledger record (``Principal``); ``None`` means unlimited.

Two steps, so a request costs nothing before it is admitted: ``enter`` (request rate,
concurrency, the gateway's capacity) runs before the body is read, parsed, rendered or
tokenized; ``Ticket.charge`` (tokens per minute) once the prompt's length is known.
Every refusal is a ``Rejected`` that names its reason (the metrics label).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvgate.gateway.http.errors import ApiError

WINDOW_S = 60.0


@dataclass
class _Window:
    """(time, amount) entries of the last minute; sum kept alongside for O(1) checks."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def trim(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            _, amount = self.entries.popleft()
            self.total -= amount

    def retry_after(self, now: float, need: int, limit: int) -> float:
        """Seconds until enough old entries leave the window to fit ``need`` more."""
        excess = self.total + need - limit
        for t, amount in self.entries:
            excess -= amount
            if excess <= 0:
                return max(1.0, t + WINDOW_S - now)
        return WINDOW_S

    def add(self, now: float, amount: int) -> None:
        if amount:
            self.entries.append((now, amount))
            self.total += amount


@dataclass
class _TenantState:
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    running: int = 0


class Rejected(ApiError):
    """A 429 or 503 from admission (a 400 for a prompt over the tenant's whole
    tokens-per-minute limit, which no wait would admit); ``reason``: requests_per_minute,
    tokens_per_minute, concurrency or capacity."""

    def __init__(self, status: int, message: str, reason: str, retry_after: float) -> None:
        code = {503: "overloaded", 400: "request_exceeds_limit"}.get(status,
                                                                     "rate_limit_exceeded")
        super().__init__(status, message, retry_after=retry_after or None, code=code)
        self.reason = reason


class Ticket:
    """Holds one admitted request's concurrency slot; ``release`` is idempotent."""

    def __init__(self, limiter: Limiter, tenant_id: object,
                 tokens_per_minute: int | None = None) -> None:
        self._limiter = limiter
        self._tenant_id = tenant_id
        self._tpm = tokens_per_minute
        self._held = True

    def add_tokens(self, n: int) -> None:
        self._limiter._state(self._tenant_id).tokens.add(self._limiter.clock(), n)

    def charge(self, prompt_tokens: int) -> None:
        """The tokens-per-minute check, once the prompt is tokenized; counts the prompt."""
        now = self._limiter.clock()
        window = self._limiter._state(self._tenant_id).tokens
        window.trim(now)
        tpm = self._tpm
        if tpm is not None and window.total + prompt_tokens > tpm:
            if prompt_tokens > tpm:  # never admissible: a 400, not a 429 to retry forever
                raise Rejected(400, f"This prompt ({prompt_tokens} tokens) exceeds the "
                               f"tenant's limit of {tpm} tokens per minute; it can never be "
                               "admitted.", "tokens_per_minute", 0.0)
            raise Rejected(429, f"Rate limit reached: {tpm} tokens per minute for this tenant.",
                           "tokens_per_minute", window.retry_after(now, prompt_tokens, tpm))
        window.add(now, prompt_tokens)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._state(self._tenant_id).running -= 1
            self._limiter.inflight -= 1


class Limiter:
    def __init__(self, max_inflight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self.clock = clock
        self._tenants: dict[object, _TenantState] = {}

    def _state(self, tenant_id: object) -> _TenantState:
        return self._tenants.setdefault(tenant_id, _TenantState())

    def admit(self, principal: object, prompt_tokens: int) -> Ticket:
        """Both steps at once (``enter`` then ``charge``), for callers that know the prompt."""
        ticket = self.enter(principal)
        try:
            ticket.charge(prompt_tokens)
        except Rejected:
            ticket.release()
            raise
        return ticket

    def enter(self, principal: object) -> Ticket:
        """Admit or raise ``Rejected``: 429 (tenant over its request rate or concurrency) or
        503 (gateway full), with Retry-After. Cheap: nothing of the request is read yet."""
        now = self.clock()
        tid = principal.tenant_id  # type: ignore[attr-defined]
        st = self._state(tid)
        st.requests.trim(now)
        rpm = principal.requests_per_minute  # type: ignore[attr-defined]
        conc = principal.max_concurrent  # type: ignore[attr-defined]
        if rpm is not None and st.requests.total + 1 > rpm:
            raise Rejected(429, f"Rate limit reached: {rpm} requests per minute for this "
                           "tenant.", "requests_per_minute",
                           st.requests.retry_after(now, 1, rpm))
        tpm = principal.tokens_per_minute  # type: ignore[attr-defined]
        if tpm is not None:
            st.tokens.trim(now)
            if st.tokens.total >= tpm:  # spent: any prompt is over, so none is read
                raise Rejected(429, f"Rate limit reached: {tpm} tokens per minute for this "
                               "tenant.", "tokens_per_minute",
                               st.tokens.retry_after(now, 1, tpm))
        if conc is not None and st.running >= conc:
            raise Rejected(429, f"Too many concurrent requests: this tenant may run {conc} "
                           "at once.", "concurrency", 1.0)
        if self.inflight >= self.max_inflight:
            raise Rejected(503, "The server is at capacity; retry shortly.", "capacity", 1.0)
        st.requests.add(now, 1)
        st.running += 1
        self.inflight += 1
        return Ticket(self, tid, tpm)
