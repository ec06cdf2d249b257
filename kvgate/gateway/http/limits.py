"""Admission control: per-tenant rate limits (sliding one-minute window) and the gateway's
capacity.

In memory, per process: with several replicas each enforces its share. Limits come from the
tenant's ledger record (``Principal``); ``None`` means unlimited.

Two steps, so a request costs nothing before it is admitted: ``enter`` (request rate,
concurrency, the gateway's capacity) runs before the body is read, parsed, rendered or
tokenized; ``Ticket.charge`` (tokens per minute) once the prompt's length is known.
Every refusal is a ``Rejected`` that names its reason (the metrics label).

Tokens per minute hold under concurrency: ``charge`` debits the request's worst case, its
prompt plus its most output (``max_tokens`` x choices), before it runs, and ``settle``
gives back what it did not produce once it is billed. The window's debits never exceed the
limit, so concurrent requests cannot overshoot it. A request that named no ``max_tokens``
(``flexible``) has its output cut to what the window has left instead of being refused
(it then ends with ``finish_reason: length``).

Capacity counts what costs the engine: requests admitted but not yet handed to it
(``pending``) plus the engine's own waiting and running sequences (``occupancy``). A stream
whose client stopped reading leaves the engine's running set, so it does not keep others
out; open requests of any kind are bounded separately (``max_open``) so memory is.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvgate.gateway.protocol.errors import ApiError

WINDOW_S = 60.0
OPEN_FACTOR = 8  # open requests allowed per unit of capacity (the hard ceiling)


class _Entry:
    __slots__ = ("amount", "t")

    def __init__(self, t: float, amount: int) -> None:
        self.t = t
        self.amount = amount


@dataclass
class _Window:
    """Entries of the last minute; sum kept alongside for O(1) checks. An entry's amount
    may shrink while it is in the window (a refund), never grow."""

    entries: deque[_Entry] = field(default_factory=deque)
    total: int = 0

    def trim(self, now: float) -> None:
        while self.entries and self.entries[0].t <= now - WINDOW_S:
            self.total -= self.entries.popleft().amount

    def retry_after(self, now: float, need: int, limit: int) -> float:
        """Seconds until enough old entries leave the window to fit ``need`` more."""
        excess = self.total + need - limit
        for e in self.entries:
            excess -= e.amount
            if excess <= 0:
                return max(1.0, e.t + WINDOW_S - now)
        return WINDOW_S

    def add(self, now: float, amount: int) -> _Entry | None:
        if amount <= 0:
            return None
        entry = _Entry(now, amount)
        self.entries.append(entry)
        self.total += amount
        return entry

    def refund(self, now: float, entry: _Entry, amount: int) -> None:
        """Take ``amount`` back from ``entry`` if it is still in the window (one that left
        it counts no more anyway)."""
        self.trim(now)
        amount = min(amount, entry.amount)
        if amount > 0 and entry.t > now - WINDOW_S:
            entry.amount -= amount
            self.total -= amount


@dataclass
class _TenantState:
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    running: int = 0


class Rejected(ApiError):
    """A 429 or 503 from admission (a 400 for a request over the tenant's whole
    tokens-per-minute limit, which no wait would admit); ``reason``: requests_per_minute,
    tokens_per_minute, concurrency, capacity or open_requests."""

    def __init__(self, status: int, message: str, reason: str, retry_after: float,
                 param: str | None = None) -> None:
        code = {503: "overloaded", 400: "request_exceeds_limit"}.get(status,
                                                                     "rate_limit_exceeded")
        super().__init__(status, message, retry_after=retry_after or None, code=code,
                         param=param)
        self.reason = reason


class Ticket:
    """One admitted request: its concurrency slot, its capacity claim until it is handed to
    the engine (``submitted``), and its tokens-per-minute debit until ``settle``.
    ``release`` is idempotent."""

    def __init__(self, limiter: Limiter, tenant_id: object,
                 tokens_per_minute: int | None = None) -> None:
        self._limiter = limiter
        self._tenant_id = tenant_id
        self._tpm = tokens_per_minute
        self._held = True
        self._pending = True
        self._entry: _Entry | None = None
        self._debited_output = 0  # output tokens debited and not settled yet

    def charge(self, prompt_tokens: int, max_output: int = 0, outputs: int = 1,
               flexible: bool = False, param: str = "max_tokens") -> int:
        """The tokens-per-minute check, once the prompt is tokenized: debits the prompt and
        ``max_output`` tokens for each of ``outputs`` (choices x prompts) and returns the
        output bound each may use: ``max_output``, or less for a ``flexible`` request when
        the window has less left (at least one token each, else a 429)."""
        limiter = self._limiter
        now = limiter.clock()
        window = limiter._state(self._tenant_id).tokens
        window.trim(now)
        tpm = self._tpm
        worst = prompt_tokens + max_output * outputs
        if tpm is not None and window.total + worst > tpm:
            if prompt_tokens > tpm:  # never admissible: a 400, not a 429 to retry forever
                raise Rejected(400, f"This prompt ({prompt_tokens} tokens) exceeds the "
                               f"tenant's limit of {tpm} tokens per minute; it can never be "
                               "admitted.", "tokens_per_minute", 0.0)
            least = prompt_tokens + (outputs if flexible else max_output * outputs)
            if least > tpm:
                raise Rejected(400, f"This request's prompt ({prompt_tokens} tokens) plus "
                               f"its '{param}' ({max_output}) for each of its {outputs} "
                               f"outputs exceeds the tenant's limit of {tpm} tokens per "
                               f"minute; it can never be admitted. Lower '{param}'.",
                               "tokens_per_minute", 0.0, param=param)
            left = tpm - window.total - prompt_tokens
            if not flexible or left < outputs:
                raise Rejected(429, f"Rate limit reached: {tpm} tokens per minute for this "
                               "tenant (a request counts its prompt and its most output "
                               "until it finishes).", "tokens_per_minute",
                               window.retry_after(now, least, tpm))
            max_output = left // outputs
        self._debited_output = max_output * outputs
        self._entry = window.add(now, prompt_tokens + self._debited_output)
        return max_output

    def settle(self, completion_tokens: int) -> None:
        """The request is billed with ``completion_tokens``: the unused part of its output
        debit goes back to the window (a request that made more than it was debited for,
        which the engine's bound should prevent, is debited the rest)."""
        limiter = self._limiter
        debited, self._debited_output = self._debited_output, 0
        window = limiter._state(self._tenant_id).tokens
        now = limiter.clock()
        if completion_tokens > debited:
            window.add(now, completion_tokens - debited)
        elif self._entry is not None:
            window.refund(now, self._entry, debited - completion_tokens)

    def submitted(self) -> None:
        """Handed to the engine: from now on the engine's occupancy counts it."""
        if self._pending:
            self._pending = False
            self._limiter.pending -= 1

    def release(self) -> None:
        """The handler is done. Output debited and never billed (the request failed before
        its engine run) is given back; its prompt stays counted."""
        if not self._held:
            return
        self._held = False
        if self._debited_output:
            self.settle(0)
        self.submitted()
        self._limiter._state(self._tenant_id).running -= 1
        self._limiter.inflight -= 1


class Limiter:
    """``capacity``: what the gateway admits at once, counted as requests not yet handed to
    the engine plus ``occupancy()`` (the engine's waiting and running sequences, set once
    it is open); ``max_open``: a hard ceiling on admitted requests still open, whatever
    they wait for (default ``OPEN_FACTOR`` x capacity)."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic,
                 max_open: int | None = None) -> None:
        self.max_inflight = capacity
        self.max_open = max_open if max_open is not None else OPEN_FACTOR * capacity
        self.inflight = 0  # admitted requests whose handler has not returned
        self.pending = 0  # of those, the ones not handed to the engine yet
        self.occupancy: Callable[[], int] = lambda: 0
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
        if self.pending + self.occupancy() >= self.max_inflight:
            raise Rejected(503, "The server is at capacity; retry shortly.", "capacity", 1.0)
        if self.inflight >= self.max_open:
            raise Rejected(503, "The server has too many open requests; retry shortly.",
                           "open_requests", 1.0)
        st.requests.add(now, 1)
        st.running += 1
        self.inflight += 1
        self.pending += 1
        return Ticket(self, tid, tpm)
