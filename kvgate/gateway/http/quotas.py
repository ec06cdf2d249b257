"""Tenants as the cache sees them: the namespace of a tenant and the quota and the
cache reservation pushed for it.

The namespace is computed on the server from the authenticated key's tenant only, so a
client can never name one; this module is the one place that spells it. Quotas and
reservations live in the ledger (tenant rows) and are pushed to the cache when a request,
an admin change or the reservation biller's periodic read shows a value the cache has not
been told yet.
"""

from __future__ import annotations

from collections.abc import Callable

from kvgate.gateway.ledger import Principal
from kvgate.gateway.protocol.namespace import tenant_namespace

SetQuota = Callable[[str, "int | None"], None]
SetReservation = Callable[[str, "int | None", "int | None"], None]
Reservation = tuple["int | None", "int | None"]  # device bytes, host bytes


class QuotaSync:
    """Remembers the quota and the reservation last pushed per namespace, so a request
    pushes only changes."""

    def __init__(self, set_quota: SetQuota, set_reservation: SetReservation) -> None:
        self._set_quota = set_quota
        self._set_reservation = set_reservation
        self._pushed: dict[str, int | None] = {}
        self._pushed_reservation: dict[str, Reservation] = {}

    def apply(self, principal: Principal) -> str:
        """The principal's namespace, with its tenant's quota and reservation pushed if they
        changed (keys made by the CLI or another replica carry the current values in their
        principal)."""
        if principal.tenant_id is None:
            raise ValueError("an admin key has no cache namespace")
        ns = tenant_namespace(principal.tenant_id)
        self._push_quota(ns, principal.cache_quota_bytes)
        self._push_reservation(ns, (principal.cache_reserved_device_bytes,
                                    principal.cache_reserved_host_bytes))
        return ns

    def set(self, tenant_id: int, quota_bytes: int | None,
            reservation: Reservation = (None, None)) -> None:
        """An admin change: push it now."""
        ns = tenant_namespace(tenant_id)
        self._push_quota(ns, quota_bytes, force=True)
        self._push_reservation(ns, reservation, force=True)

    def reserve(self, tenant_id: int, reservation: Reservation) -> None:
        """The ledger's current reservation of a tenant (the biller's periodic read)."""
        self._push_reservation(tenant_namespace(tenant_id), reservation)

    def forget(self, tenant_id: int) -> None:
        """The tenant changed or went away: the next request pushes whatever it carries."""
        self._pushed.pop(tenant_namespace(tenant_id), None)
        self._pushed_reservation.pop(tenant_namespace(tenant_id), None)

    def _push_quota(self, ns: str, quota: int | None, force: bool = False) -> None:
        if force or ns not in self._pushed or self._pushed[ns] != quota:
            self._set_quota(ns, quota)
            self._pushed[ns] = quota

    def _push_reservation(self, ns: str, reservation: Reservation, force: bool = False) -> None:
        if force or self._pushed_reservation.get(ns, (None, None)) != reservation:
            self._set_reservation(ns, *reservation)
            self._pushed_reservation[ns] = reservation
