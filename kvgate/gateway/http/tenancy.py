"""Tenants as the cache sees them: the namespace of a tenant and the quota and the
guaranteed cache share pushed for it.

The namespace is computed on the server from the authenticated key's tenant only, so a
client can never name one; this module is the one place that spells it. Quotas and shares
live in the ledger (tenant rows) and are pushed to the cache when a request or an admin
change shows a value the cache has not been told yet.
"""

from __future__ import annotations

from collections.abc import Callable

from kvgate.gateway.ledger import Principal

SetQuota = Callable[[str, "int | None"], None]
SetShare = Callable[[str, "int | None"], None]


def tenant_namespace(tenant_id: int) -> str:
    return f"tenant:{tenant_id}"


class QuotaSync:
    """Remembers the quota and the guaranteed share (None: the fair share) last pushed per
    namespace, so a request pushes only changes."""

    def __init__(self, set_quota: SetQuota, set_share: SetShare) -> None:
        self._set_quota = set_quota
        self._set_share = set_share
        self._pushed: dict[str, int | None] = {}
        self._pushed_share: dict[str, int | None] = {}

    def apply(self, principal: Principal) -> str:
        """The principal's namespace, with its tenant's quota and share pushed if they
        changed (keys made by the CLI or another replica carry the current values in their
        principal)."""
        if principal.tenant_id is None:
            raise ValueError("an admin key has no cache namespace")
        ns = tenant_namespace(principal.tenant_id)
        self._push(ns, principal.cache_quota_bytes, principal.cache_share_bytes)
        return ns

    def set(self, tenant_id: int, quota_bytes: int | None,
            share_bytes: int | None = None) -> None:
        """An admin change: push it now."""
        self._push(tenant_namespace(tenant_id), quota_bytes, share_bytes, force=True)

    def forget(self, tenant_id: int) -> None:
        """The tenant changed or went away: the next request pushes whatever it carries."""
        self._pushed.pop(tenant_namespace(tenant_id), None)
        self._pushed_share.pop(tenant_namespace(tenant_id), None)

    def _push(self, ns: str, quota: int | None, share: int | None,
              force: bool = False) -> None:
        if force or ns not in self._pushed or self._pushed[ns] != quota:
            self._set_quota(ns, quota)
            self._pushed[ns] = quota
        if force or ns not in self._pushed_share or self._pushed_share[ns] != share:
            self._set_share(ns, share)
            self._pushed_share[ns] = share
