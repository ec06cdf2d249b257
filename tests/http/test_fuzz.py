"""Schemathesis drives /openapi.json against the live server: no input it generates for the
client API may produce a server error or a status the document does not list."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from kvgate.gateway.http.openapi import spec
from testkit import ADMIN_KEY, Admin, Session, Tenant, ThreadServer, request_body
from testkit.hostile import dumps, hostile_segment, hostile_text, hostile_value, quote

CLIENT_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/messages")


@pytest.fixture(scope="module")
def fuzz_tenant(admin: Admin) -> Tenant:
    return admin.tenant()


@pytest.mark.parametrize("path", CLIENT_PATHS)
def test_client_api_fuzz(server: ThreadServer, fuzz_tenant: Tenant, path: str) -> None:
    schema = schemathesis.openapi.from_dict(spec())
    schema.config.update(base_url=server.url)
    (operation,) = [r.ok() for r in schema.get_all_operations() if r.ok().path == path]
    headers = {"Authorization": f"Bearer {fuzz_tenant.key}"}

    @given(data=st.data())
    @settings(max_examples=6, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy())
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 4)  # keep it quick
        case.call_and_validate(headers=headers,
                               checks=[not_a_server_error, status_code_conformance])

    run()


# -- hostile input on every endpoint ---------------------------------------------------------

TEMPLATES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": request_body("chat", "hi", 2).body,
    "/v1/completions": request_body("completions", "hi", 2).body,
    "/v1/messages": request_body("messages", "hi", 2).body,
    "/admin/tenants": {"name": "fuzz"},
    "/admin/tenants/{id}": {"status": "active"},
    "/admin/tenants/{id}/keys": {"role": "tenant"},
}
# Fields worth aiming at beyond a template's own (each endpoint reads some of them).
AIMED = ("model", "messages", "prompt", "system", "stop", "stop_sequences", "max_tokens",
         "max_completion_tokens", "seed", "n", "temperature", "top_p", "top_k",
         "cache_control", "stream", "stream_options", "response_format", "name", "plan",
         "status", "role", "requests_per_minute", "tokens_per_minute", "max_concurrent",
         "cache_ttl_seconds", "cache_quota_bytes", "budget_daily_micros",
         "budget_monthly_micros", "priority", "min_priority", "max_running_sequences")
NESTED = ("content", "text-part", "ttl", "role", "block-type")


def _operations() -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, item in spec()["paths"].items()
            for method, op in item.items() if isinstance(op, dict)]


def _hostile_body(data: st.DataObject, path: str) -> bytes | None:
    template = TEMPLATES.get(path)
    if template is None:
        return None
    body: dict[str, Any] = json.loads(json.dumps(template))
    value = data.draw(hostile_value)
    where = data.draw(st.sampled_from(("field", "nested", "key")))
    if where == "key":
        body[data.draw(hostile_text)] = value
    elif where == "nested" and "messages" in body:
        part = data.draw(st.sampled_from(NESTED))
        block: dict[str, Any] = {"type": "text", "text": "hi"}
        if part == "content":
            body["messages"] = [{"role": "user", "content": value}]
        elif part == "text-part":
            block["text"] = value
            body["messages"] = [{"role": "user", "content": [block]}]
        elif part == "ttl":
            block["cache_control"] = {"type": "ephemeral", "ttl": value}
            body["messages"] = [{"role": "user", "content": [block]}]
        elif part == "role":
            body["messages"] = [{"role": value, "content": "hi"}]
        else:
            block["type"] = value
            body["messages"] = [{"role": "user", "content": [block]}]
    else:
        body[data.draw(st.sampled_from(AIMED))] = value
    if path == "/admin/tenants" and body.get("name") == "fuzz":
        body["name"] = f"fuzz-{uuid.uuid4().hex[:8]}"  # a valid name must not collide
    return dumps(body)


@pytest.mark.parametrize(("method", "path"), _operations(),
                         ids=[f"{m} {p}" for m, p in _operations()])
def test_hostile_input_is_never_a_server_error(
        server: ThreadServer, admin: Admin, fuzz_tenant: Tenant, method: str,
        path: str) -> None:
    """Hostile strings and structures (``testkit.hostile``) in every body field the
    endpoint reads, in keys, nested in messages, in path ids and query values: a status
    below 500 and, for an error, the error shape of the API the path belongs to."""
    target = admin.tenant("fuzz-target")
    key = ADMIN_KEY if path.startswith("/admin") else fuzz_tenant.key
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    http = Session(server.url)

    @given(data=st.data())
    @settings(max_examples=15, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(data: st.DataObject) -> None:
        url = path
        if "{id}" in url:  # a hostile id, or the target's (its body is then the hostile part)
            seg = data.draw(st.one_of(hostile_segment, st.just(str(target.id))))
            if method == "DELETE" and seg == str(target.id):
                seg = "9223372036854775808"
            url = url.replace("{id}", quote(seg))
        query = {name: data.draw(hostile_segment)
                 for name in ("tenant_id", "since", "until", "group_by")
                 if method == "GET" or path == "/admin/cache"}
        if query:
            url += "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items()
                                  if data.draw(st.booleans()))
        body = _hostile_body(data, path) if method in ("POST", "PATCH") else None
        r = http.request(method, url, data=body, headers=headers)
        assert r.status_code < 500, (method, url, body and body[:300], r.text[:500])
        if r.status_code >= 400:
            err = r.json()
            if path.startswith("/v1/messages"):
                assert err["type"] == "error" and err["error"]["message"], err
            else:
                assert set(err["error"]) == {"message", "type", "param", "code"}, err

    try:
        run()
        assert http.get("/healthz").status_code == 200
    finally:
        http.close()
