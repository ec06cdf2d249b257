"""Schemathesis drives /openapi.json against the live server: no input it generates for the
client API may produce a server error or a status the document does not list."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from gateway.http.openapi import spec
from tests.support import Admin, Tenant, ThreadServer

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
