"""The engine core in a process of its own (``--api-servers 1``), through the real SDKs.

What must hold across the process boundary: answers and cache hits as in one process,
figures the operator reads fresh, the engine's refusals as the API's 400s, cancellation
reaching the core, and a core that dies mid-request: in-flight requests end with an error
and are billed once for what was delivered, new ones get 503 until it is back, until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
import requests

from kvgate.gateway.engine.client import EngineClient
from testkit import ADMIN_KEY, MiB, ThreadServer
from testkit.client import cached_tokens
from testkit.core import client_of, wait_until

SYSTEM = "You are the support desk of a bicycle shop. Answer in one short sentence. " * 8


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("core"), api_servers=1,
                      device_cache_bytes=16 * MiB) as server:
        yield server


def settled(srv: ThreadServer) -> int:
    """Its core up (a test before may have killed it): → its restarts so far."""
    wait_until(lambda: client_of(srv).up)
    return client_of(srv).restarts



def core_pid(srv: ThreadServer) -> int:
    return int(client_of(srv).info["pid"])



def chat(srv: ThreadServer, key: str, question: str, **kw: Any) -> Any:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(
        model="demo", temperature=0, max_tokens=kw.pop("max_tokens", 6),
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        **kw)


def test_the_core_is_another_process_and_serves_both_apis(srv: ThreadServer) -> None:
    assert core_pid(srv) != os.getpid()
    tenant = srv.admin.tenant("both")
    first = chat(srv, tenant.key, "Do you fix brakes?")
    again = chat(srv, tenant.key, "Do you sell helmets?")
    assert first.usage.completion_tokens == 6
    assert cached_tokens(again) >= 64  # the system prompt's blocks, held by the core
    ant = anthropic.Anthropic(base_url=srv.url, api_key=tenant.key, max_retries=0)
    msg = ant.messages.create(model="demo", max_tokens=5, system=SYSTEM, extra_body={"temperature": 0},
                              messages=[{"role": "user", "content": "Open on Sunday?"}])
    assert 1 <= msg.usage.output_tokens <= 5
    assert msg.usage.cache_read_input_tokens >= 64
    stream = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    chunks = list(stream.chat.completions.create(
        model="demo", max_tokens=12, stream=True, stream_options={"include_usage": True},
        temperature=0,  # sampled, the demo's random weights may end it early (its EOT)
        messages=[{"role": "user", "content": "Count."}]))
    assert chunks[-1].usage.completion_tokens == 12
    rows = srv.ledger_rows(tenant.id)
    assert len(rows) == 4 and all(r["n"] == 1 and r["status"] == "ok" for r in rows.values())


def test_operator_figures_come_from_the_core(srv: ThreadServer) -> None:
    tenant = srv.admin.tenant("figures")
    before = srv.admin.cache_stats()["hit_tokens"]
    chat(srv, tenant.key, "Where are you?")
    chat(srv, tenant.key, "When are you open?")
    stats = srv.admin.cache_stats()
    assert stats["hit_tokens"] > before
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    scrape = requests.get(srv.url + "/metrics", headers=headers, timeout=30).text
    hits = [line for line in scrape.splitlines() if line.startswith("kvgate_cache_hit_tokens")]
    assert hits and float(hits[0].split()[-1]) == stats["hit_tokens"]  # fresh, not a step old
    load = requests.get(srv.url + "/admin/load", headers=headers, timeout=30).json()
    assert load["device_pages"] > load["free_pages"] >= 0
    snap = requests.get(srv.url + "/admin/cache/snapshot", headers=headers, timeout=30).json()
    assert snap["seq"] >= load["event_seq"] - 1000 and snap["blocks"]
    prefixes = requests.get(srv.url + "/admin/cache/prefixes", headers=headers, timeout=30,
                            params={"tenant_id": tenant.id}).json()
    assert prefixes["prefixes"] and prefixes["prefixes"][0]["hits"] >= 1


def test_engine_refusals_are_the_apis_400s(srv: ThreadServer) -> None:
    tenant = srv.admin.tenant("refusals")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model="demo", prompt="word " * 5000, max_tokens=1)
    assert "context" in str(long_prompt.value) or "tokens" in str(long_prompt.value)
    with pytest.raises(openai.BadRequestError) as bad_ids:
        client.completions.create(model="demo", prompt=[1, 2, 10**9], max_tokens=1)
    assert "token" in str(bad_ids.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="demo", max_tokens=4, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}})
    assert chat(srv, tenant.key, "still there?").usage.completion_tokens == 6
    assert srv.ledger_rows(tenant.id) and all(
        r["status"] == "ok" for r in srv.ledger_rows(tenant.id).values())


def test_a_client_that_leaves_stops_the_core_request(srv: ThreadServer) -> None:
    tenant = srv.admin.tenant("leaves")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    stream = client.chat.completions.create(
        model="demo", max_tokens=2000, stream=True, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Go on forever."}])
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    engine = client_of(srv)
    wait_until(lambda: srv.on_loop(_running(engine)) == 0)
    wait_until(lambda: len(srv.ledger_rows(tenant.id)) == 1)
    row = next(iter(srv.ledger_rows(tenant.id).values()))
    assert row["n"] == 1 and 5 <= row["completion_tokens"] < 2000


async def _running(engine: EngineClient) -> int:
    load = await engine.load()
    return load["running"] + load["queue_depth"]


def test_a_peer_without_the_key_is_refused(srv: ThreadServer) -> None:
    path = client_of(srv).path
    assert path is not None and (os.stat(path).st_mode & 0o077) == 0
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.recv(32)  # the challenge
        sock.settimeout(10)
        # a wrong answer, then what would be a pickle: the core closes the connection (which
        # may refuse the second write, or drop our unread bytes with a reset)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"\0" * 32)
            sock.sendall(b"\0\0\0\x05cos\nsystem\n")
            assert sock.recv(64) == b""  # closed, nothing unpickled
    tenant = srv.admin.tenant("after-peer")
    assert chat(srv, tenant.key, "fine?").usage.completion_tokens == 6


def test_a_core_that_dies_fails_in_flight_bills_them_once_and_comes_back(
        srv: ThreadServer) -> None:
    base = settled(srv)
    tenant = srv.admin.tenant("crash")
    engine = client_of(srv)
    pid = core_pid(srv)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    stream = client.chat.completions.create(
        model="demo", max_tokens=4000, stream=True, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Talk."}])
    got = 0
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
            if got == 8:
                os.kill(pid, signal.SIGKILL)
    # a request while it is down: the API's own 503, nothing billed
    wait_until(lambda: engine.restarts == base + 1 or not engine._up)
    rows = srv.ledger_rows(tenant.id)
    assert len(rows) == 1
    row = next(iter(rows.values()))
    assert row["n"] == 1 and row["status"] == "error"
    assert got <= row["completion_tokens"] < 4000
    wait_until(lambda: engine.restarts == base + 1)
    assert core_pid(srv) != pid
    assert chat(srv, tenant.key, "Back?").usage.completion_tokens == 6


def test_down_core_means_503_with_retry_after(srv: ThreadServer) -> None:
    base = settled(srv)
    tenant = srv.admin.tenant("down")
    engine = client_of(srv)
    srv.on_loop(_stop_core(engine))
    resp = requests.post(srv.url + "/v1/chat/completions", headers=tenant.headers,
                         json={"model": "demo", "max_tokens": 2,
                               "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "engine_unavailable"
    assert resp.headers.get("Retry-After")
    ready = requests.get(srv.url + "/readyz", timeout=30)
    assert ready.status_code == 503 and "engine core" in ready.json()["error"]["message"]
    assert srv.ledger_rows(tenant.id) == {}
    wait_until(lambda: engine.restarts == base + 1)
    assert chat(srv, tenant.key, "up?").usage.completion_tokens == 6


async def _stop_core(engine: EngineClient) -> None:
    """Kill the core and wait until this server has noticed (before it restarts it)."""
    assert engine.proc is not None
    engine.proc.kill()
    for _ in range(200):
        if not engine._up:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the client did not notice the core's death")
