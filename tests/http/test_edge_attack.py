"""Hostile and unlucky requests against a replica and a router in front of it: every
error in the API's own shape, with the right ``param``, and the router passing on the
replica's own answer for bodies it cannot judge."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from kvgate.gateway.route.settings import RouterSettings
from testkit.admin import ADMIN_KEY, EVENTS_SECRET, Tenant
from testkit.router import RouterThread
from testkit.server import MiB, ThreadServer

METRICS_KEY = "kvg-test-metrics-key-0123456789"


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    wd = tmp_path_factory.mktemp("attack")
    # 1 MiB of device cache: 16 pages of 16 tokens, far less than the demo model's context
    with ThreadServer(wd, device="cpu", device_cache_bytes=1 * MiB, host_cache_bytes=2 * MiB,
                      default_max_tokens=4, max_body_bytes=256 * 1024, metrics_port=0,
                      metrics_key=METRICS_KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def router(replica: ThreadServer) -> Iterator[RouterThread]:
    rt = RouterThread(db=replica.settings.ledger.db, admin_key=ADMIN_KEY,
                      replicas=[replica.url], max_body_bytes=256 * 1024)
    # an operator who set the metrics key for the fleet, as /metrics's 401 tells them to
    rt.settings = RouterSettings.from_env(
        {"KVGATE_METRICS_KEY": METRICS_KEY}, port=0, log_level="warning",
        events_secret=EVENTS_SECRET, db=replica.settings.ledger.db, admin_key=ADMIN_KEY,
        replicas=[replica.url], max_body_bytes=256 * 1024)
    with rt:
        deadline = time.monotonic() + 30
        while not rt.router.pool.healthy():
            assert time.monotonic() < deadline, "the replica never joined the pool"
            time.sleep(0.05)
        yield rt


@pytest.fixture(scope="module")
def tenant(replica: ThreadServer) -> Tenant:
    return replica.admin.tenant("attack")


# A prompt the model's context holds (8192 tokens) but the device cache (256 tokens) never
# can: the engine refuses it (PromptTooLong) once the request is in.
LONG = "ab " * 1500


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2}, "messages"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 2}, "prompt"),
    ("/v1/responses", {"input": LONG, "max_output_tokens": 2}, "input"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_the_device_cache_cannot_hold_names_the_prompt_field(
        replica: ThreadServer, tenant: Tenant, path: str, body: dict[str, Any], param: str,
        stream: bool) -> None:
    """context_length_exceeded names the field that holds the prompt: the validation's
    check and ``_engine_errors`` do; the engine's refusal once admitted
    (``Generation``) says ``messages`` whatever the endpoint."""
    r = requests.post(replica.url + path, headers=tenant.headers, timeout=60,
                      json={"model": "demo", "stream": stream, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == param, err


def test_a_bad_structured_output_spec_on_responses_names_text_format(
        replica: ThreadServer, tenant: Tenant) -> None:
    """/v1/responses has no ``response_format``; its spec is ``text.format``."""
    r = requests.post(replica.url + "/v1/responses", headers=tenant.headers, timeout=60, json={
        "model": "demo", "input": "hi", "max_output_tokens": 2,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "text.format", r.json()


def _deep_with_cache_key(path: str) -> bytes:
    key = b'"metadata":{"user_id":"u1"},' if path == "/v1/messages" \
        else b'"prompt_cache_key":"k1",'
    return b'{"model":"demo","max_tokens":2,' + key + b'"messages":' + b"[" * 50_000 \
        + b"]" * 50_000 + b"}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_deep_body_naming_a_cache_key_gets_the_replicas_own_error_through_the_router(
        replica: ThreadServer, router: RouterThread, tenant: Tenant, path: str) -> None:
    """The router never refuses a body (route/prompt.py): the replica judges it. A body
    nested past Python's stack that names a cache key blows up in ``cache_key_of``
    (it catches ValueError, not RecursionError), and the router answers itself."""
    raw = _deep_with_cache_key(path)
    direct = requests.post(replica.url + path, headers=tenant.headers, data=raw, timeout=60)
    routed = requests.post(router.url + path, headers=tenant.headers, data=raw, timeout=60)
    assert direct.status_code == 400
    assert routed.status_code == direct.status_code
    assert routed.json() == direct.json()


def test_the_router_s_metrics_take_the_metrics_key(router: RouterThread) -> None:
    """The router's /metrics 401 says "the metrics key (KVGATE_METRICS_KEY) or the admin
    key", but the router reads no KVGATE_METRICS_KEY (its settings have no metrics
    section): a scraper given the fleet's metrics key is refused forever."""
    refused = requests.get(router.url + "/metrics", timeout=30)
    assert refused.status_code == 401 and "KVGATE_METRICS_KEY" in refused.text
    r = requests.get(router.url + "/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/metrics/"),
                                              ("POST", "/metrics"), ("HEAD", "/metrics")])
def test_the_metrics_port_answers_errors_in_the_api_shape(replica: ThreadServer,
                                                          method: str, path: str) -> None:
    """Every other error of the gateway is JSON with a request id; the metrics port's own
    404/405 are aiohttp's plain text without one."""
    port = replica.state.metrics.listen_port
    r = requests.request(method, f"http://127.0.0.1:{port}{path}", timeout=30)
    assert r.status_code in (404, 405)
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.text
    assert "x-request-id" in r.headers
    if method != "HEAD":
        assert "error" in r.json()


@pytest.mark.parametrize("path", ["/admin/ui", "/admin/ui/static/console.js"])
def test_console_paths_on_the_router_carry_the_console_headers(router: RouterThread,
                                                               path: str) -> None:
    """A replica's every answer under /admin/ui (its errors too) carries CSP, no framing
    and nosniff; the router answers the same paths (401, then 404 admin_on_replicas)
    without them."""
    for headers in ({}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
        r = requests.get(router.url + path, headers=headers, timeout=30)
        assert r.status_code in (401, 404)
        assert r.headers.get("X-Content-Type-Options") == "nosniff", (r.status_code, r.headers)
        assert "frame-ancestors 'none'" in r.headers.get("Content-Security-Policy", "")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
@pytest.mark.parametrize("via", ["replica", "router"])
def test_a_body_that_does_not_decompress_is_a_400_not_a_500(
        replica: ThreadServer, router: RouterThread, tenant: Tenant, encoding: str,
        via: str) -> None:
    """``Content-Encoding: gzip`` over bytes that are not gzip: aiohttp raises
    ``RequestPayloadError`` from ``request.read()``, which ``edge.body.read_body`` does not
    catch (only ``HttpProcessingError``): any tenant gets a 500 internal_error and a
    traceback in the operator's log per request."""
    base = replica.url if via == "replica" else router.url
    r = requests.post(base + "/v1/chat/completions", data=b"\x1f\x8b not compressed",
                      headers={**tenant.headers, "Content-Encoding": encoding}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_http_request"
