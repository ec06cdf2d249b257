"""The edge's half of the fair share: token limits that hold under concurrency (the worst
case debited at admission, the unused part refunded at the bill), capacity that clients
which stopped reading cannot hold, the write timeout, hang-ups that are not errors, and
request priorities with the tenant's scheduling terms passed to the engine."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from kvgate.gateway.engine import GenerateRequest
from testkit import MiB, Session, Tenant, ThreadServer, request_body, slow_client

CHAT = "/v1/chat/completions"


def _openai(server: ThreadServer, tenant: Tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def _prompt_tokens(server: ThreadServer, body: dict[str, Any]) -> int:
    """What the body's prompt counts, asked of a tenant with no limits."""
    t = server.admin.tenant("probe")
    r = Session(server.url).post(CHAT, json={**body, "max_tokens": 1, "stream": False},
                                 headers=t.headers)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def _rows(server: ThreadServer, tenant: Tenant, n: int) -> dict[str, dict[str, Any]]:
    """The tenant's ledger rows once there are ``n`` of them."""
    for _ in range(600):
        rows = server.ledger_rows(tenant.id)
        if len(rows) >= n:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"tenant {tenant.id} has {len(server.ledger_rows(tenant.id))} rows, "
                         f"not {n}")


# -- tokens per minute -----------------------------------------------------------------------

def test_concurrent_requests_cannot_overshoot_the_token_rate(server: ThreadServer,
                                                             model_id: str) -> None:
    """12 concurrent requests of a 500-token/min tenant: at most 500 tokens (plus one
    request's worth) are served; the rest are 429 with Retry-After."""
    limit, max_tokens = 500, 100
    t = server.admin.tenant("tpm", tokens_per_minute=limit)
    messages = [{"role": "user", "content": "tell me everything"}]
    prompt = _prompt_tokens(server, {"model": model_id, "messages": messages})

    async def one(client: openai.AsyncOpenAI) -> Any:
        try:
            return await client.chat.completions.create(
                model=model_id, messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens, extra_body={"ignore_eos": True})
        except openai.RateLimitError as exc:
            assert int(exc.response.headers["Retry-After"]) >= 1
            return exc

    async def flood() -> list[Any]:
        async with _openai(server, t) as client:
            return await asyncio.gather(*(one(client) for _ in range(12)))

    answers = asyncio.run(flood())
    served = [a for a in answers if not isinstance(a, Exception)]
    assert served and len(served) < 12
    total = sum(a.usage.prompt_tokens + a.usage.completion_tokens for a in served)
    assert total <= limit + prompt + max_tokens, total
    rows = _rows(server, t, len(served))
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows.values()) == total


def test_unused_output_is_refunded_so_small_answers_leave_room(server: ThreadServer,
                                                               model_id: str) -> None:
    """Each request is debited its prompt and 200 output tokens; one that ends at its first
    token gives the rest back, so the tenant can send again at once, many times over."""
    eos = server.state.engine.tokenizer.eos_token_ids[0]
    body: dict[str, Any] = {
            "model": model_id, "messages": [{"role": "user", "content": "short please"}],
            "max_tokens": 200, "temperature": 0, "logit_bias": {str(eos): 100}}
    prompt = _prompt_tokens(server, body)
    t = server.admin.tenant("refund", tokens_per_minute=2 * prompt + 300)
    http = Session(server.url)
    for _ in range(6):  # without the refund the second one would not fit
        r = http.post(CHAT, json=body, headers=t.headers)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2
    big = {**body, "max_tokens": prompt + 301}  # its worst case can never fit: a 400
    r = http.post(CHAT, json=big, headers=t.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert "Retry-After" not in r.headers


def test_a_request_without_max_tokens_is_cut_to_what_the_minute_has_left(
        server: ThreadServer, model_id: str) -> None:
    """The default bound (here 8 tokens) is lowered to what is left, finish_reason
    length, rather than refused; a request that names its bound is refused instead."""
    body: dict[str, Any] = {"model": model_id, "ignore_eos": True,
                            "messages": [{"role": "user", "content": "go on"}]}
    prompt = _prompt_tokens(server, body)
    t = server.admin.tenant("rest", tokens_per_minute=prompt + 3)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=t.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # 8 named: it can never fit
        client.chat.completions.create(model=model_id, messages=body["messages"],
                                       max_tokens=8, extra_body={"ignore_eos": True})
    assert err.value.body["param"] == "max_tokens"  # type: ignore[index]
    r = client.chat.completions.create(model=model_id, messages=body["messages"],
                                       extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"
    claude = anthropic.Anthropic(base_url=server.url, api_key=t.key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError):  # the minute is spent
        claude.messages.create(model=model_id, max_tokens=1,
                               messages=[{"role": "user", "content": "go on"}])


# -- priorities and the engine's scheduling terms --------------------------------------------

@pytest.fixture()
def engine_requests(server: ThreadServer, monkeypatch: pytest.MonkeyPatch
                    ) -> list[GenerateRequest]:
    """The requests the engine is given from now on."""
    engine = server.state.engine
    seen: list[GenerateRequest] = []
    real: Callable[..., Any] = engine.generate

    def spy(request: GenerateRequest) -> Any:
        seen.append(request)
        return real(request)

    monkeypatch.setattr(engine, "generate", spy)
    return seen


@pytest.mark.parametrize("bad", [-1, 1001, -1001, True, 1.5, "1", [0], {"p": 1}])
def test_a_bad_priority_is_a_400_in_each_apis_shape(server: ThreadServer, model_id: str,
                                                    tenant: Tenant, bad: Any) -> None:
    """Not an integer, out of range, or below the tenant's floor (0 by default)."""
    http = Session(server.url)
    for kind in ("chat", "completions", "messages"):
        path, body = request_body(kind, "hi", 2, model=model_id, priority=bad)
        r = http.post(path, json=body, headers=tenant.headers)
        assert r.status_code == 400, (kind, r.text)
        if kind == "messages":
            err = r.json()
            assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
            assert "priority" in err["error"]["message"]
        else:
            assert r.json()["error"]["param"] == "priority", r.text
    r = http.post("/v1/responses", json={"model": model_id, "input": "hi",
                                         "max_output_tokens": 2, "priority": bad},
                  headers=tenant.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text


def test_priority_and_the_tenants_terms_reach_the_engine(
        server: ThreadServer, model_id: str, engine_requests: list[GenerateRequest]) -> None:
    admin = server.admin
    server.on_loop(server.state.ledger.create_plan("weighty", input=1_000_000,
                                                   scheduling_weight=7))
    t = admin.tenant("terms", plan="weighty")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=t.key, max_retries=0)
    claude = anthropic.Anthropic(base_url=server.url, api_key=t.key, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=model_id, messages=messages, max_tokens=2,
                                   extra_body={"priority": 5})
    with pytest.raises(openai.BadRequestError):  # below the default floor, 0
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=2,
                                       extra_body={"priority": -3})
    r = admin.http.patch(f"/admin/tenants/{t.id}",
                         json={"min_priority": -10, "max_running_sequences": 3})
    assert r.status_code == 200, r.text
    assert (r.json()["min_priority"], r.json()["max_running_sequences"]) == (-10, 3)
    claude.messages.create(model=model_id, max_tokens=2, messages=messages,
                           extra_body={"priority": -3})
    client.completions.create(model=model_id, prompt="hi", max_tokens=2)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=model_id, max_tokens=2, messages=messages,
                               extra_body={"priority": -11})
    terms = [(r.tenant, r.weight, r.priority, r.max_running) for r in engine_requests]
    assert terms == [(str(t.id), 7.0, 5, 0), (str(t.id), 7.0, -3, 3), (str(t.id), 7.0, 0, 3)]


@pytest.mark.parametrize("fields", [
    {"min_priority": -1001}, {"min_priority": 1001}, {"min_priority": True},
    {"min_priority": 1.5}, {"min_priority": "0"}, {"max_running_sequences": 0},
    {"max_running_sequences": -1}, {"max_running_sequences": 2**31},
    {"max_running_sequences": 2**63}, {"max_running_sequences": "3"}])
def test_hostile_scheduling_fields_are_400(server: ThreadServer, tenant: Tenant,
                                           fields: dict[str, Any]) -> None:
    admin = server.admin
    r = admin.http.patch(f"/admin/tenants/{tenant.id}", json=fields)
    assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(fields)), r.text
    r = admin.http.post("/admin/tenants", json={"name": "never", **fields})
    assert r.status_code == 400, r.text


# -- slow and vanishing clients --------------------------------------------------------------

@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """A server of its own: a write timeout of 1 s and room for 4 requests in the engine
    (2 running, 2 waiting)."""
    with ThreadServer(tmp_path_factory.mktemp("slow"), device="cpu",
                      device_cache_bytes=32 * MiB, host_cache_bytes=16 * MiB, max_running=2,
                      max_queue=2, write_timeout=1.0) as srv:
        yield srv


@pytest.fixture()
def small_send_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    slow_client.small_send_buffers(monkeypatch)


def _stalled_stream(server: ThreadServer, tenant: Tenant, max_tokens: int) -> socket.socket:
    return slow_client.stalled_request(
        server.port, CHAT, slow_client.big_stream_body(server.state.engine.model_id,
                                                       max_tokens), tenant.headers)


def _requests_total(server: ThreadServer, tenant: Tenant, status: int) -> float:
    value = server.state.metrics.registry.get_sample_value(
        "kvgate_requests_total", {"endpoint": CHAT, "status": str(status),
                                  "tenant": str(tenant.id)})
    return value or 0.0


def _engine_idle(server: ThreadServer) -> None:
    engine = server.state.engine
    for _ in range(1200):
        if engine.num_running() == 0 and engine.queue_depth() == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the engine never went idle")


def _in_engine(server: ThreadServer, open_requests: int) -> None:
    """Until ``open_requests`` handlers are open and none waits to reach the engine."""
    limiter = server.state.limiter
    for _ in range(1200):
        if limiter.inflight == open_requests and limiter.pending == 0:
            return
        time.sleep(0.01)
    engine = server.state.engine
    raise AssertionError(f"{limiter.inflight} requests open, {limiter.pending} pending, "
                         f"{engine.num_running()} running, {engine.queue_depth()} queued")


def _room(server: ThreadServer) -> None:
    """Until the engine's queue has room for one more request."""
    engine = server.state.engine
    for _ in range(1200):
        if engine.queue_depth() < server.settings.engine.max_queue - 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"the engine's queue stayed at {engine.queue_depth()}")


def _chat(server: ThreadServer, tenant: Tenant) -> int:
    path, body = request_body("chat", "hello", 2, model=server.state.engine.model_id)
    return Session(server.url).post(path, json=body, headers=tenant.headers).status_code


@pytest.mark.usefixtures("small_send_buffers")
def test_a_client_that_stops_reading_is_cut_and_billed_once_as_cancelled(
        slow: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    t = slow.admin.tenant("stalls")
    with caplog.at_level(logging.INFO, logger="kvgate"):
        sock = _stalled_stream(slow, t, max_tokens=1000)
        try:
            (row,) = _rows(slow, t, 1).values()  # billed while the socket is still open
        finally:
            sock.close()
        _engine_idle(slow)
    assert row["n"] == 1 and row["status"] == "cancelled", row
    assert 1 <= row["completion_tokens"] < 1000  # cut before the end
    assert _requests_total(slow, t, 408) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    (line,) = [r.getMessage() for r in caplog.records if "accepted no bytes" in r.getMessage()]
    assert str(t.id) in line and f"{row['completion_tokens']} tokens" in line
    assert _chat(slow, t) == 200  # and the server keeps serving


@pytest.mark.usefixtures("small_send_buffers")
def test_a_hang_up_is_one_info_line_and_499_not_an_error(
        slow: ThreadServer, caplog: pytest.LogCaptureFixture) -> None:
    """The client stops reading, then hangs up before the write timeout's end (a
    connection lost under a paused write, the path that logged a traceback)."""
    t = slow.admin.tenant("hangs-up")
    slow.state.settings.http.write_timeout = 120.0
    try:
        with caplog.at_level(logging.INFO, logger="kvgate"):
            sock = _stalled_stream(slow, t, max_tokens=300)
            _written_out(slow)  # the engine is done; the handler's writes are stuck
            assert slow.state.limiter.inflight == 1 and not slow.ledger_rows(t.id)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # a reset, as a client that dies sends
            (row,) = _rows(slow, t, 1).values()
            _engine_idle(slow)
            for _ in range(100):
                if _requests_total(slow, t, 499):
                    break
                time.sleep(0.05)
    finally:
        slow.state.settings.http.write_timeout = 1.0
    assert row["n"] == 1 and row["status"] == "cancelled", row
    assert _requests_total(slow, t, 499) == 1 and _requests_total(slow, t, 500) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r for r in caplog.records if r.levelno == logging.INFO
            and "hung up" in r.getMessage() and str(t.id) in r.getMessage()]


def _written_out(server: ThreadServer) -> None:
    """Until the request just sent has been handed to the engine and finished there."""
    engine = server.state.engine
    for _ in range(1200):
        if server.state.limiter.pending == 0 and engine.num_running() + engine.queue_depth():
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the request never reached the engine")
    _engine_idle(server)


@pytest.mark.usefixtures("small_send_buffers")
def test_clients_that_stop_reading_do_not_keep_others_out(slow: ThreadServer) -> None:
    """Twice the gateway's capacity in streams whose clients never read: once the engine
    is done with them they hold no capacity, and another tenant is served, not 503."""
    slow.state.settings.http.write_timeout = 120.0
    flood, victim = slow.admin.tenant("flood"), slow.admin.tenant("victim")
    capacity = slow.settings.engine.max_running + slow.settings.engine.max_queue
    socks: list[socket.socket] = []
    try:
        for _ in range(2 * capacity):  # one by one, as the engine has room for them
            _room(slow)
            socks.append(_stalled_stream(slow, flood, max_tokens=300))
            _in_engine(slow, len(socks))
        _engine_idle(slow)
        assert slow.state.limiter.inflight == 2 * capacity  # every handler is still open
        assert _chat(slow, victim) == 200
    finally:
        for s in socks:
            s.close()
        slow.state.settings.http.write_timeout = 1.0
    rows = _rows(slow, flood, 2 * capacity)
    assert all(r["n"] == 1 and r["status"] == "cancelled" for r in rows.values()), rows


def test_stalled_streams_are_parked_with_the_shipped_buffers(slow: ThreadServer) -> None:
    """No test-only socket patch: plain text streams of up to 5,000 tokens whose clients
    never read fill the server's small stream buffers within a few hundred tokens, the
    engine parks them (no slot, no pages), and another tenant is served."""
    slow.state.settings.http.write_timeout = 120.0
    flood, victim = slow.admin.tenant("parks"), slow.admin.tenant("served")
    engine = slow.state.engine
    capacity = slow.settings.engine.max_running + 1  # every slot, and one waiting for a slot
    body = {"model": engine.model_id, "max_tokens": 5000, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "write me a book"}]}
    socks: list[socket.socket] = []
    try:
        for _ in range(capacity):
            socks.append(slow_client.stalled_request(slow.port, CHAT, body, flood.headers))
            _in_engine(slow, len(socks))
        for _ in range(2400):
            if len(engine.scheduler.parked) == capacity:
                break
            time.sleep(0.05)
        assert len(engine.scheduler.parked) == capacity, engine.scheduling()
        assert engine.num_running() == 0 and engine.queue_depth() == 0
        assert _chat(slow, victim) == 200
    finally:
        for s in socks:
            s.close()
        slow.state.settings.http.write_timeout = 1.0
    rows = _rows(slow, flood, capacity)
    assert all(r["n"] == 1 and r["status"] == "cancelled" for r in rows.values()), rows
    assert all(r["completion_tokens"] < 2000 for r in rows.values()), rows


def test_write_timeout_flag_and_environment(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    from kvgate.gateway.cli import build_parser
    from kvgate.gateway.config import Settings
    from kvgate.gateway.http.serve import settings_from_args
    from kvgate.gateway.route.settings import RouterSettings

    assert Settings().http.write_timeout == 30.0
    s = settings_from_args(build_parser().parse_args(["serve", "--write-timeout", "2.5"]))
    assert s.http.write_timeout == 2.5
    monkeypatch.setenv("KVGATE_WRITE_TIMEOUT", "7")
    assert settings_from_args(build_parser().parse_args(["serve"])).http.write_timeout == 7.0
    router = RouterSettings.from_env()
    assert router.http.write_timeout == 7.0
