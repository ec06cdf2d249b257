"""A tenant's cache namespace: computed from the authenticated key's tenant only, so a
client can never name one; the one place that spells it."""

from __future__ import annotations


def tenant_namespace(tenant_id: int) -> str:
    return f"tenant:{tenant_id}"
