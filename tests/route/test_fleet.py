"""The router in front of real replicas: exact prefix routing, auth, streaming through the
official SDK, failover, event loss and resync, and billing once across the fleet."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import openai
import requests

from kvgate.cachestore.hashing import block_hashes, root_digest
from kvgate.gateway.protocol.namespace import tenant_namespace
from kvgate.gateway.route.choose import RecentShare
from testkit.admin import ADMIN_KEY
from testkit.ci import cannot_run
from testkit.redis_server import RedisServer, missing
from testkit.router import RouterThread
from testkit.server import ProcessServer
from tests.route.conftest import Fleet, replica_flags, start_fleet

SYSTEM = "You are a careful assistant for the routing tests. " * 6


def _billed_rows(fleet: Fleet) -> dict[str, dict]:
    return fleet.replicas[0].ledger_rows(fleet.tenant.id)


def _prompt_hashes(fleet: Fleet, content: str) -> list[bytes]:
    engine = fleet.replicas[0].state.engine
    ids = engine.render_chat([{"role": "user", "content": content}])
    root = root_digest(engine.store.model_id, "", tenant_namespace(fleet.tenant.id))
    return block_hashes(root, ids, engine.store.block_size)


def test_requests_go_to_the_replica_holding_the_longest_prefix(fleet: Fleet) -> None:
    prompts = [SYSTEM + f"conversation {k}: " + "tell me more. " * 10 for k in range(4)]
    for p in prompts:
        assert fleet.chat(p).status_code == 200
    fleet.wait(lambda: all(
        any(fleet.router.router.index.cached_blocks(r.settings.events.replica_id,
                                                    _prompt_hashes(fleet, p))
            == len(_prompt_hashes(fleet, p)) for r in fleet.replicas) for p in prompts),
        "the router's view to hold every prompt")
    router = fleet.router.router
    for p in prompts:
        hashes = _prompt_hashes(fleet, p)
        # the router's hashes are the engine's: a replica's view holds them all
        holders = [r for r in fleet.replicas
                   if router.index.cached_blocks(r.settings.events.replica_id, hashes) == len(hashes)]
        assert holders
        # and that view is exact: the replica's own cache has the same blocks
        for r in holders:
            assert all(h in r.state.engine.store.index for h in hashes)
        # the prefix alone decides here: every prompt shares the system prompt, so one
        # replica took them all, and the balance term (tests/route/test_choose.py) would
        # move some turns once it is a few requests ahead
        router.recent = RecentShare()
        r = fleet.chat(p + "and one more turn")
        assert r.status_code == 200
        usage = r.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= len(hashes) * 16 - 16
        # the router's parts follow the replica's own in server-timing
        timing = [part.split(";")[0].strip() for part in r.headers["server-timing"].split(",")]
        assert "engine" in timing
        assert timing[-4:] == ["router", "router-render", "router-choose", "router-upstream"]


def test_keys_are_checked_at_the_router_in_each_api_shape(fleet: Fleet) -> None:
    before = [r.state.engine.num_running() for r in fleet.replicas]
    r = requests.post(fleet.router.url + "/v1/chat/completions",
                      headers={"Authorization": "Bearer kvg_not-a-key"},
                      json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and set(err) >= {"message", "type", "param"}
    assert r.headers["x-request-id"]
    r = requests.post(fleet.router.url + "/v1/messages", headers={"x-api-key": "nope"},
                      json={"model": "demo", "max_tokens": 4,
                            "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"]
    r = requests.post(fleet.router.url + "/v1/chat/completions",
                      json={"model": "demo", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert [r.state.engine.num_running() for r in fleet.replicas] == before
    assert _billed_rows(fleet) == {}
    # a request the replica refuses comes back in its own shape, untouched
    r = requests.post(fleet.router.url + "/v1/chat/completions", headers=fleet.tenant.headers,
                      json={"model": "demo", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_messages"
    # the router's own metrics are the operator's: a tenant key is refused
    assert requests.get(fleet.router.url + "/metrics",
                        headers=fleet.tenant.headers).status_code == 401
    scrape = requests.get(fleet.router.url + "/metrics",
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert scrape.status_code == 200 and "kvgate_router_replicas_healthy" in scrape.text


def test_streams_pass_through_to_the_openai_sdk_and_bill_once(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=fleet.router.url + "/v1", api_key=fleet.tenant.key,
                           max_retries=0)
    answered = 0
    for k in range(3):
        stream = client.chat.completions.create(
            model="demo", max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": f"question {k}"}])
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 8
        if k:
            assert usage.prompt_tokens_details.cached_tokens > 0
        answered += 1
    plain = client.chat.completions.create(
        model="demo", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "plain"}])
    assert plain.usage is not None and plain.usage.completion_tokens == 4
    answered += 1
    rows = _billed_rows(fleet)
    assert len(rows) == answered and all(row["n"] == 1 for row in rows.values())


def test_a_client_that_closes_after_the_last_event_did_not_hang_up(fleet: Fleet) -> None:
    """A client may close its connection as soon as ``data: [DONE]`` (or Anthropic's
    ``message_stop``) has reached it, before the replica's end of the body reaches the
    router: its answer is whole, so the router counts no 499 and logs no hang-up."""
    def counts() -> dict[str, float]:
        scrape = requests.get(fleet.router.url + "/metrics", timeout=10,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        out: dict[str, float] = {}
        for status, value in re.findall(
                r'kvgate_requests_total\{[^}]*endpoint="/v1/(?:chat/completions|messages)"'
                r'[^}]*status="(\d+)"'
                r'[^}]*\} ([0-9.e+]+)', scrape):
            out[status] = out.get(status, 0.0) + float(value)
        return out

    before = counts()
    host, port = fleet.router.url.removeprefix("http://").split(":")
    requests_ = [("/v1/chat/completions", b"data: [DONE]",
                  {"model": "demo", "max_tokens": 2, "stream": True,
                   "messages": [{"role": "user", "content": "close early"}]}),
                 ("/v1/messages", b"event: message_stop",
                  {"model": "demo", "max_tokens": 2, "stream": True,
                   "messages": [{"role": "user", "content": "close early"}]})]
    for i in range(12):
        path, last, body = requests_[i % 2]
        raw = json.dumps(body).encode()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (path.encode(), fleet.tenant.key.encode(), len(raw), raw))
            got = b""
            while last not in got:
                data = sock.recv(65536)
                assert data, got
                got += data
    def new() -> dict[str, float]:
        return {k: v - before.get(k, 0.0) for k, v in counts().items()
                if v != before.get(k, 0.0)}

    fleet.wait(lambda: sum(new().values()) >= 12, "the router to count every request")
    assert new() == {"200": 12.0}


def test_a_stopped_replica_leaves_the_pool_and_its_requests_go_elsewhere(fleet: Fleet) -> None:
    prompt = SYSTEM + "failover"
    assert fleet.chat(prompt).status_code == 200
    hashes = _prompt_hashes(fleet, prompt)
    fleet.wait(lambda: any(fleet.router.router.index.cached_blocks(
        r.settings.events.replica_id, hashes) for r in fleet.replicas), "the prefix in the view")
    holder = next(r for r in fleet.replicas if fleet.router.router.index.cached_blocks(
        r.settings.events.replica_id, hashes))
    url = holder.url
    holder.stop()  # its port now refuses connections; the pool has not noticed yet
    r = fleet.chat(prompt)  # routed to the holder first, refused, retried on the other
    assert r.status_code == 200
    t0 = time.monotonic()
    fleet.wait(lambda: url not in fleet.healthy(), "the stopped replica to leave the pool")
    assert time.monotonic() - t0 < 1.5
    for k in range(3):
        assert fleet.chat(prompt + str(k)).status_code == 200
    rows = _billed_rows(fleet)
    assert len(rows) == 5 and all(row["n"] == 1 for row in rows.values())


def test_a_stream_cut_by_a_killed_replica_is_never_replayed(tmp_path: Path,
                                                            redis_url: str) -> None:
    replica = ProcessServer(tmp_path / "p0", **replica_flags(tmp_path, "p0", redis_url)).start()
    router = RouterThread(db=f"sqlite:///{tmp_path / 'ledger.db'}", admin_key=ADMIN_KEY,
                          replicas=[replica.url], events_url=redis_url).start()
    try:
        tenant = replica.admin.tenant("kill")
        deadline = time.monotonic() + 20
        while not router.router.pool.healthy():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with requests.post(router.url + "/v1/chat/completions", headers=tenant.headers,
                           stream=True, timeout=60,
                           json={"model": "demo", "max_tokens": 400, "stream": True,
                                 "ignore_eos": True,
                                 "messages": [{"role": "user", "content": "long"}]}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(150)]
            replica.kill()
            seen += list(lines)  # what the router still sends: the end, once
        roles = [ln for ln in seen if b'"role"' in ln]
        assert len(roles) == 1 and not any(b"[DONE]" in ln for ln in seen)
        last = [ln for ln in seen if ln.strip()][-1]
        assert b"upstream_failed" in last  # an error event ends it: not complete
        delivered = sum(b'"content"' in ln for ln in seen)
        replica.start()  # its usage journal: what the stream delivered is billed, once
        (row,) = replica.ledger_rows(tenant.id).values()  # its one request, billed once
        assert row["n"] == 1 and row["status"] == "interrupted"
        assert row["completion_tokens"] >= delivered - 64
    finally:
        router.stop()
        replica.close()


def test_lost_events_are_resynchronised_from_snapshots(tmp_path: Path) -> None:
    if missing():
        cannot_run(missing() or "")
    server = RedisServer().start()
    fleet = start_fleet(tmp_path, server.url)
    port = server.port
    try:
        assert fleet.chat(SYSTEM + "before the outage").status_code == 200
        # Redis goes away: the replicas' events are dropped, serving goes on
        server.kill()
        during = [SYSTEM + f"during the outage {k}" for k in range(3)]
        for p in during:
            assert fleet.chat(p).status_code == 200
        restarted = server.start()  # the operator restarts it on its address, empty
        assert restarted.port == port
        try:
            after = SYSTEM + "after the outage"
            assert fleet.chat(after).status_code == 200
            # the first batch after the outage shows a gap: the view is rebuilt
            fleet.wait(lambda: fleet.router.router.index.gaps >= 1, "a gap to be seen")
            fleet.wait(fleet.synced, "views resynchronised")
            for p in [*during, after]:
                hashes = _prompt_hashes(fleet, p)
                assert any(fleet.router.router.index.cached_blocks(r.settings.events.replica_id,
                                                                   hashes) == len(hashes)
                           for r in fleet.replicas), p
            # and a router started now (no events seen at all) loads every snapshot
            fresh = RouterThread(db=fleet.router.settings.routing.db, admin_key=ADMIN_KEY,
                                 replicas=[r.url for r in fleet.replicas],
                                 events_url=restarted.url).start()
            fleet.extra.append(_Stopper(fresh))
            fleet.wait(lambda: len(fresh.router.index.views) == len(fleet.replicas)
                       and all(v.synced for v in fresh.router.index.views.values()),
                       "the new router's views")
            hashes = _prompt_hashes(fleet, after)
            assert any(fresh.router.index.cached_blocks(r.settings.events.replica_id, hashes)
                       == len(hashes) for r in fleet.replicas)
        finally:
            restarted.stop()
    finally:
        fleet.router.stop()
        for r in fleet.replicas + fleet.extra:
            r.close()


class _Stopper:
    def __init__(self, router: RouterThread) -> None:
        self.router = router

    def close(self) -> None:
        self.router.stop()
