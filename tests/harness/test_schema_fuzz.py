"""Schemathesis against the ``/openapi.json`` the running server publishes: for every
operation, generated requests (with the admin key or a tenant key, as the operation needs)
never get a 5xx, and every response matches the document (status, content type, body,
headers). ``make test`` runs a fixed (derandomized) set; ``KVGATE_FUZZ_EXAMPLES=500`` runs
that many fresh random cases per operation on demand.

The fuzz server is its own process: random DELETEs of tenants and keys must not disturb
the other tests' tenants. Operations run in a fixed order, destructive ones last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvgate.gateway.http.openapi import spec
from testkit import ADMIN_KEY, MiB, ProcessServer, Tenant, request_body
from testkit.hostile import dumps, hostile_segment, hostile_value, quote

EXAMPLES = int(os.environ.get("KVGATE_FUZZ_EXAMPLES", "0"))
GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/messages",
              "/v1/messages/count_tokens", "/tokenize", "/detokenize")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
_ORDER = {"GET": 0, "POST": 1, "PATCH": 2, "DELETE": 3}


def _operations() -> list[tuple[str, str]]:
    ops = [(method.upper(), path) for path, item in spec()["paths"].items()
           for method, op in item.items() if isinstance(op, dict)
           and path != "/openapi.json"]  # the document itself: the loader fetches it
    return sorted(ops, key=lambda mp: (_ORDER.get(mp[0], 9), not mp[1].startswith("/v1"),
                                       mp[1]))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    with ProcessServer(tmp_path_factory.mktemp("kvgate-fuzz"),
                       device_cache_bytes=16 * MiB, default_max_tokens=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server: ProcessServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


@pytest.fixture(scope="module")
def fuzz_tenant(fuzz_server: ProcessServer) -> Tenant:
    return fuzz_server.admin.tenant("fuzz")


@pytest.mark.parametrize(("method", "path"), _operations(),
                         ids=[f"{m} {p}" for m, p in _operations()])
def test_operation_never_5xx_and_matches_spec(
        fuzz_server: ProcessServer, fuzz_schema: schemathesis.BaseSchema, fuzz_tenant: Tenant,
        method: str, path: str) -> None:
    (operation,) = [r.ok() for r in fuzz_schema.get_all_operations()
                    if r.ok().path == path and r.ok().method.upper() == method]
    key = ADMIN_KEY if path.startswith("/admin") else fuzz_tenant.key
    headers = {"Authorization": f"Bearer {key}"}
    generating = path in GENERATING

    @given(data=st.data())
    @settings(max_examples=EXAMPLES or (12 if generating else 25), deadline=None,
              database=None, derandomize=not EXAMPLES,
              suppress_health_check=list(HealthCheck))
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy())
        body = case.body
        if generating and isinstance(body, dict) and data.draw(st.integers(0, 3)):
            # Most cases name the served model, so validation past the model check is
            # reached too; the rest keep the generated name.
            body["model"] = "demo"
            for field in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(field), int):
                    body[field] = min(body[field], 4)  # the fuzz is about input, not output
        case.call_and_validate(base_url=fuzz_server.url, headers=headers, checks=CHECKS,
                               timeout=60)

    run()
    assert fuzz_server.alive()


def test_fuzz_server_still_serves(fuzz_server: ProcessServer) -> None:
    tenant = fuzz_server.admin.tenant("after-fuzz")
    path, body = request_body("chat", "ok?", 2)
    r = requests.post(fuzz_server.url + path, json=body, headers=tenant.headers, timeout=60)
    assert r.status_code == 200, r.text


def _admin_operations() -> list[tuple[str, str]]:
    """Admin routes that need the admin key: the console's page is public by design
    (``security: []`` in the spec; it carries no data, every call it makes needs the key)."""
    paths = spec()["paths"]
    return [(m, p) for m, p in _operations() if p.startswith("/admin")
            and paths[p][m.lower()].get("security") != []]


@pytest.mark.parametrize(("method", "path"), _admin_operations(),
                         ids=[f"{m} {p}" for m, p in _admin_operations()])
def test_admin_operation_refuses_a_tenant_key(
        fuzz_server: ProcessServer, fuzz_schema: schemathesis.BaseSchema,
        method: str, path: str) -> None:
    """Whatever the body, a tenant key on an admin route is a 403 in the documented shape.
    A fresh tenant: the fuzzed DELETEs before may have removed the shared one."""
    (operation,) = [r.ok() for r in fuzz_schema.get_all_operations()
                    if r.ok().path == path and r.ok().method.upper() == method]
    headers = fuzz_server.admin.tenant("refused").headers

    @given(data=st.data())
    @settings(max_examples=5, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy())
        response = case.call_and_validate(base_url=fuzz_server.url, headers=headers,
                                          checks=CHECKS, timeout=60)
        assert response.status_code == 403, response.text

    run()


@pytest.mark.parametrize(("method", "path"), _operations(),
                         ids=[f"{m} {p}" for m, p in _operations()])
def test_hostile_schema_cases_never_5xx(
        fuzz_server: ProcessServer, fuzz_schema: schemathesis.BaseSchema, fuzz_tenant: Tenant,
        method: str, path: str) -> None:
    """The schema's cases with one hostile value (``testkit.hostile``: lone
    surrogates, NULs, Unicode digits, huge integers, deep nesting, containers for strings)
    put in a body field or as the path id: never a 5xx, always the error shape. Path ids
    are never plain ASCII digits, so no real tenant or key is deleted."""
    (operation,) = [r.ok() for r in fuzz_schema.get_all_operations()
                    if r.ok().path == path and r.ok().method.upper() == method]
    key = ADMIN_KEY if path.startswith("/admin") else fuzz_tenant.key
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    @given(data=st.data())
    @settings(max_examples=EXAMPLES or 8, deadline=None, database=None,
              derandomize=not EXAMPLES, suppress_health_check=list(HealthCheck))
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy())
        url = path
        if "{id}" in url:
            url = url.replace("{id}", quote(data.draw(hostile_segment)))
        body = case.body if isinstance(case.body, dict) else None
        raw = None
        if method in ("POST", "PATCH"):
            body = dict(body or {})
            name = data.draw(st.sampled_from(sorted(body) or ["name"]))
            body[name] = data.draw(hostile_value)
            if "max_tokens" in body and isinstance(body["max_tokens"], int):
                body["max_tokens"] = min(body["max_tokens"], 4)
            raw = dumps(body)
        r = requests.request(method, fuzz_server.url + url, data=raw, headers=headers,
                             timeout=60)
        assert r.status_code < 500, (method, url, raw and raw[:300], r.text[:500])
        if r.status_code >= 400:
            err = r.json()
            if path.startswith("/v1/messages"):
                assert err["type"] == "error" and err["error"]["message"], err
            else:
                assert set(err["error"]) == {"message", "type", "param", "code"}, err

    run()
    assert fuzz_server.alive()
