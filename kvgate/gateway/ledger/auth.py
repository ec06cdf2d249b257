"""API keys: how they look, how they are stored, and the in-memory lookup cache."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import LedgerUnavailable

KEY_PREFIX = "kvg_"
VISIBLE_PREFIX_LEN = 12  # "kvg_" + 8 random characters: tells keys apart, reveals nothing
AUTH_CACHE_TTL_S = 1.0  # a revoked key stops working within this long on every replica
# With the database unreachable, a key's last successful lookup (live, or a miss) still
# answers for this long after it was made; other keys get 503 (``LedgerUnavailable``).
AUTH_GRACE_S = 300.0


@dataclass(frozen=True)
class Principal:
    """Who is calling, with the tenant settings the request path needs (no extra query)."""

    key_id: int
    role: str  # "tenant" | "admin"
    tenant_id: int | None
    tenant_name: str | None
    tenant_status: str  # "active" | "suspended" | "deleted"; admin keys: "active"
    cache_ttl_seconds: int
    cache_quota_bytes: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    plan_id: int | None
    cache_reserved_device_bytes: int | None = None  # None: no reservation
    cache_reserved_host_bytes: int | None = None
    cache_max_ttl_seconds: int = 86400
    # Spend budgets in micro-units of the plan's currency per UTC day / month (None: none):
    # the tenant's, and this key's own (``budgets.py``)
    budget_daily_micros: int | None = None
    budget_monthly_micros: int | None = None
    key_budget_daily_micros: int | None = None
    key_budget_monthly_micros: int | None = None
    # Scheduling: the lowest request priority the tenant may ask for (lower runs first),
    # its cap on running sequences (None: none) and its plan's scheduling weight
    min_priority: int = 0
    max_running_sequences: int | None = None
    scheduling_weight: int = 1

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def has_budget(self) -> bool:
        """Whether any spend budget applies to this key's requests."""
        return any(b is not None for b in (
            self.budget_daily_micros, self.budget_monthly_micros,
            self.key_budget_daily_micros, self.key_budget_monthly_micros))


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """Keys are 256 random bits, so a plain SHA-256 (no salt, no slow hash) is enough and
    keeps lookup a single indexed equality match."""
    # surrogateescape: a header's undecodable bytes hash (and so match nothing), never raise
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class KeyCache:
    """Hash → (principal or None, fetched at), trusted for ``AUTH_CACHE_TTL_S``.

    Every replica re-reads a key from the database once its entry is a second old, which is
    how other replicas learn of a revocation (or a tenant's new limits) without any
    messaging. The replica that revokes drops the entry at once. Misses are cached too, so
    a client hammering with a bad key costs one query a second; concurrent lookups of one
    stale key share a single query.

    When that query fails because the database is away (``LedgerUnavailable``), the entry
    answers for up to ``grace_s`` after its last successful lookup, then the lookup fails
    (HTTP 503). Only a lookup's own result is ever reused: an entry this replica dropped
    (its key revoked here, or a tenant changed) has nothing to fall back on, so a revoked
    key never comes back from memory; a revocation made on another replica during an
    outage reaches this one when the database does, or after ``grace_s``.
    """

    def __init__(self, ttl_s: float = AUTH_CACHE_TTL_S, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic,
                 grace_s: float = AUTH_GRACE_S) -> None:
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal | None, float]] = {}
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}

    async def get(self, digest: str,
                  load: Callable[[str], Awaitable[Principal | None]]) -> Principal | None:
        hit = self._entries.get(digest)
        if hit is not None and self.clock() - hit[1] < self.ttl_s:
            return hit[0]
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        try:
            fetched_at = self.clock()
            try:
                principal = await load(digest)
            except LedgerUnavailable:
                if hit is None or self.clock() - hit[1] >= self.grace_s \
                        or self._entries.get(digest) is not hit:
                    raise
                fut.set_result(hit[0])
                return hit[0]
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: there may be no waiter
            raise
        finally:
            self._inflight.pop(digest, None)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (principal, fetched_at)
        fut.set_result(principal)
        return principal

    def invalidate(self, digest: str | None = None) -> None:
        if digest is None:
            self._entries.clear()
        else:
            self._entries.pop(digest, None)
