"""The operator's side of a running gateway, over HTTP: tenants, keys, usage, the cache.

One admin key for every server the tests and benchmarks start; a benchmark pointed at a
server it did not start passes that server's key instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import requests

ADMIN_KEY = "kvg_test_admin_key_0123456789"
# The cache events secret of test replicas and routers (KVGATE_EVENTS_SECRET)
EVENTS_SECRET = "kvg-test-events-secret-0123456789"


class Session(requests.Session):
    """requests with a base URL and a default timeout, so callers write paths only."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None,
                 timeout_s: float = 60.0) -> None:
        super().__init__()
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.headers.update(headers or {})

    def request(self, method: str, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        path = url.decode() if isinstance(url, bytes) else url
        return super().request(method, self.base_url + path, *args, **kwargs)


@dataclass(frozen=True)
class ApiKey:
    id: int
    key: str  # the secret, shown by the server once


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    key: str
    key_id: int

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class Admin:
    """Every call checks the status it documents and returns the decoded body; anything
    else raises with the server's own error text, so a failing test says what went wrong."""

    def __init__(self, url: str, key: str = ADMIN_KEY) -> None:
        self.url = url
        self.http = Session(url, {"Authorization": f"Bearer {key}"})

    def tenant(self, prefix: str = "t", *, name: str | None = None, **fields: Any) -> Tenant:
        """A new tenant (``fields``: quotas, limits, TTL) with one key. Names are unique
        (``prefix`` and a random suffix) unless ``name`` is given."""
        name = name or f"{prefix}-{uuid.uuid4().hex[:8]}"
        t = self._call(201, "POST", "/admin/tenants", json={"name": name, **fields})
        k = self.new_key(int(t["id"]))
        return Tenant(int(t["id"]), name, k.key, k.id)

    def new_key(self, tenant_id: int) -> ApiKey:
        k = self._call(201, "POST", f"/admin/tenants/{tenant_id}/keys")
        return ApiKey(int(k["id"]), k["key"])

    def revoke(self, key_id: int) -> None:
        self._call(200, "DELETE", f"/admin/keys/{key_id}")

    def usage(self, tenant_id: int) -> dict[str, Any]:
        """The tenant's totals: requests, prompt/cached/cache-write/completion tokens, cost."""
        report = self._call(200, "GET", "/admin/usage", params={"tenant_id": tenant_id})
        totals: dict[str, Any] = report["totals"]
        return totals

    def cache_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._call(200, "GET", "/admin/cache/stats")
        return stats

    def flush(self, tenant_id: int) -> int:
        """Drops the tenant's cached blocks; returns how many."""
        r = self._call(200, "DELETE", "/admin/cache", params={"tenant_id": tenant_id})
        return int(r["flushed_blocks"])

    def close(self) -> None:
        self.http.close()

    def _call(self, expected: int, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        if r.status_code != expected:
            raise AssertionError(f"{method} {path} answered {r.status_code}, not {expected}: "
                                 f"{r.text}")
        return r.json()
