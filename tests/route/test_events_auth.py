"""Cache events from whoever can write to the stream: batches forged without the secret,
unsigned, signed for another replica, replayed, from another run of the replica, or with
a range the replica could not have made (200,000 events, a jump far ahead, events at the
next numbers that the replica never made) are refused or make the router rebuild that
replica's view from the replica itself; afterwards the router's view of every replica is
its index, and real events go on being applied. Reconciliation finds what a view lost or
gained, and finds nothing when nothing went wrong."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from kvgate.cachestore.events import CacheEvent
from kvgate.gateway.config import updated
from kvgate.gateway.edge.context import EDGE
from kvgate.gateway.protocol.wire import (
    MAX_BATCH,
    STREAM,
    EventBatch,
    EventsMisconfigured,
    Rejected,
    batch_mac,
    events_key,
    verify,
)
from kvgate.gateway.route import app as route_app
from kvgate.gateway.route.app import create_router_app
from kvgate.gateway.route.settings import RouterSettings
from testkit.admin import ADMIN_KEY, EVENTS_SECRET
from testkit.router import RouterThread
from testkit.server import ROOT, server_settings
from tests.route.conftest import Fleet
from tests.route.test_fleet import SYSTEM, _prompt_hashes

KEY = events_key(EVENTS_SECRET)
WRONG = events_key("not-the-deployment-secret")


# -- what the router holds, read on its own loop ----------------------------------------------

async def _copy_views(router: Any) -> dict[str, tuple[str, int, bool, dict[bytes, str]]]:
    return {rid: (v.epoch, v.seq, v.synced, dict(v.blocks))
            for rid, v in router.index.views.items()}


def _views(router: RouterThread) -> dict[str, tuple[str, int, bool, dict[bytes, str]]]:
    result: dict[str, tuple[str, int, bool, dict[bytes, str]]] = \
        router.on_loop(_copy_views(router.router))
    return result


def _truth(fleet: Fleet, i: int) -> tuple[int, dict[bytes, str]]:
    seq, blocks = fleet.replicas[i].state.engine.store.snapshot()
    return seq, {b.block_hash: b.tier for b in blocks}


def _exact(fleet: Fleet, router: RouterThread | None = None) -> bool:
    """Every replica's view in the router is its index, at its last event."""
    views = _views(router or fleet.router)
    for i, replica in enumerate(fleet.replicas):
        view = views.get(replica.settings.events.replica_id)
        seq, blocks = _truth(fleet, i)
        if view is None or not view[2] or view[1] != seq or view[3] != blocks:
            return False
    return True


def _metric(router: RouterThread, name: str, **labels: str) -> float:
    assert router.app is not None
    value = router.app[EDGE].metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


def _rejected(fleet: Fleet, reason: str) -> float:
    return _metric(fleet.router, "kvgate_router_events_rejected_total", reason=reason)


def _xadd(fleet: Fleet, fields: dict[str, str] | dict[bytes, bytes]) -> None:
    client = redis.Redis.from_url(fleet.events_url)
    try:
        client.xadd(STREAM, fields)  # type: ignore[arg-type]
    finally:
        client.close()


def _batch(fleet: Fleet, i: int, events: list[tuple[str, bytes, str]], *,
           first: int | None = None, epoch: str | None = None,
           replica: str | None = None) -> EventBatch:
    """A batch for replica ``i`` at its next event numbers (or ``first``)."""
    rid = fleet.replicas[i].settings.events.replica_id
    view = _views(fleet.router)[rid]
    start = view[1] + 1 if first is None else first
    evs = [CacheEvent(start + k, kind, "forged", h, tier)  # type: ignore[arg-type]
           for k, (kind, h, tier) in enumerate(events)]
    return EventBatch(replica or rid, epoch or view[0], start, start + len(evs) - 1, evs)


def _settled(fleet: Fleet) -> None:
    fleet.wait(lambda: _exact(fleet), "the router's views to equal the replicas' indexes")


def _holder(fleet: Fleet, content: str) -> tuple[int, list[bytes]]:
    """Send a prompt; → the replica whose view holds its blocks, and the blocks."""
    assert fleet.chat(content).status_code == 200
    hashes = _prompt_hashes(fleet, content)
    index = fleet.router.router.index
    fleet.wait(lambda: any(index.cached_blocks(r.settings.events.replica_id, hashes) == len(hashes)
                           for r in fleet.replicas), "the prompt's blocks in the view")
    _settled(fleet)
    i = next(i for i, r in enumerate(fleet.replicas)
             if index.cached_blocks(r.settings.events.replica_id, hashes) == len(hashes))
    return i, hashes


def _cached_tokens(fleet: Fleet, content: str) -> int:
    r = fleet.chat(content)
    assert r.status_code == 200
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


# -- forged, unsigned, signed for another replica ---------------------------------------------

def test_forged_and_unsigned_batches_move_no_prefix(fleet: Fleet) -> None:
    content = SYSTEM + "the victim's conversation"
    holder, hashes = _holder(fleet, content)
    other = 1 - holder
    before = {r: _rejected(fleet, r) for r in ("unsigned", "bad_signature")}
    # the attack of the report: the prefix "stored" on the other replica and "removed" from
    # the holder, at the next event numbers of each
    steal = _batch(fleet, other, [("stored", h, "device") for h in hashes])
    drop = _batch(fleet, holder, [("removed", h, "device") for h in hashes])
    for batch in (steal, drop):
        _xadd(fleet, batch.fields())  # unsigned
        _xadd(fleet, batch.fields(WRONG))  # signed with another secret
        forged = batch.fields(KEY)
        last = forged["mac"][-1]
        forged["mac"] = forged["mac"][:-1] + ("0" if last != "0" else "1")  # one digit off
        _xadd(fleet, forged)
    fleet.wait(lambda: _rejected(fleet, "unsigned") == before["unsigned"] + 2
               and _rejected(fleet, "bad_signature") == before["bad_signature"] + 4,
               "the forged batches to be refused")
    _settled(fleet)
    index = fleet.router.router.index
    assert index.cached_blocks(fleet.replicas[holder].settings.events.replica_id, hashes) == len(hashes)
    assert index.cached_blocks(fleet.replicas[other].settings.events.replica_id, hashes) == 0
    assert _cached_tokens(fleet, content) >= (len(hashes) - 1) * 16  # still to the holder


def test_a_batch_signed_for_one_replica_cannot_speak_for_another(fleet: Fleet) -> None:
    _holder(fleet, SYSTEM + "two replicas")
    before = {r: _rejected(fleet, r) for r in ("bad_signature", "unknown_replica")}
    genuine = _batch(fleet, 0, [("stored", secrets.token_bytes(16), "device")])
    relabelled = genuine.fields(KEY)
    relabelled["replica"] = fleet.replicas[1].settings.events.replica_id  # the MAC covers the id
    _xadd(fleet, relabelled)
    stranger = _batch(fleet, 0, [("stored", secrets.token_bytes(16), "device")],
                      replica="r-not-in-the-pool")
    _xadd(fleet, stranger.fields(KEY))  # signed, but no replica of this router's
    fleet.wait(lambda: _rejected(fleet, "bad_signature") == before["bad_signature"] + 1
               and _rejected(fleet, "unknown_replica") == before["unknown_replica"] + 1,
               "both refused")
    assert "r-not-in-the-pool" not in _views(fleet.router)  # no view made for it
    _settled(fleet)


# -- replayed --------------------------------------------------------------------------------

def test_replayed_batches_are_ignored_without_moving_anything(fleet: Fleet) -> None:
    for k in range(3):
        _holder(fleet, SYSTEM + f"replayed conversation {k}")
    client = redis.Redis.from_url(fleet.events_url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(STREAM)  # type: ignore[assignment]
    finally:
        client.close()
    assert entries
    index = fleet.router.router.index
    resyncs, gaps = index.resyncs, index.gaps
    views = _views(fleet.router)
    epochs = {v[0].encode() for v in views.values()}
    unsigned = _rejected(fleet, "unsigned")
    replayed = [f for _id, f in entries if f.get(b"epoch") in epochs]  # this fleet's
    assert len(replayed) >= 3
    for fields in replayed:  # every genuine batch again, in order, as signed
        _xadd(fleet, fields)
    # and one from an earlier run of replica 0 (its epoch then), signed
    old = _batch(fleet, 0, [("stored", secrets.token_bytes(16), "device")], first=1,
                 epoch="0123456789abcdef")
    other_epoch = _rejected(fleet, "other_epoch")
    _xadd(fleet, old.fields(KEY))
    _xadd(fleet, {"end": "of the replay"})  # unsigned: the follower got this far
    fleet.wait(lambda: _rejected(fleet, "unsigned") == unsigned + 1, "the replay read")
    assert _rejected(fleet, "other_epoch") == other_epoch + 1
    assert _views(fleet.router) == views
    assert (index.resyncs, index.gaps) == (resyncs, gaps)  # no snapshot was fetched
    _settled(fleet)


# -- sequence jumps ----------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
def test_a_batch_of_200000_no_op_events_never_freezes_the_view(fleet: Fleet,
                                                               signed: bool) -> None:
    """The report's attack: one batch moving the router's number 200,000 past the
    replica's, so that its real events were skipped as already applied. Unsigned it is
    refused; signed (a leaked secret) it is a range no publisher sends: refused, and the
    view is rebuilt from the replica."""
    holder, _ = _holder(fleet, SYSTEM + "before the flood")
    rid = fleet.replicas[holder].settings.events.replica_id
    noop = [("removed", secrets.token_bytes(16), "device") for _ in range(200_000)]
    reason = "impossible_range" if signed else "unsigned"
    before, resyncs = _rejected(fleet, reason), fleet.router.router.index.resyncs
    _xadd(fleet, _batch(fleet, holder, noop).fields(KEY if signed else None))
    fleet.wait(lambda: _rejected(fleet, reason) == before + 1, "the flood refused")
    if signed:
        fleet.wait(lambda: fleet.router.router.index.resyncs > resyncs, "a resync")
    _settled(fleet)
    assert _views(fleet.router)[rid][1] == _truth(fleet, holder)[0]  # not 200,000 ahead
    # real events are applied again: a new prompt's blocks reach the view
    after, hashes = _holder(fleet, SYSTEM + "after the flood")
    assert fleet.router.router.index.cached_blocks(
        fleet.replicas[after].settings.events.replica_id, hashes) == len(hashes)


def test_a_miscounted_signed_batch_is_refused_and_resynced(fleet: Fleet) -> None:
    _holder(fleet, SYSTEM + "miscounted")
    batch = _batch(fleet, 0, [("stored", secrets.token_bytes(16), "device")] * 3)
    fields = batch.fields(KEY)
    fields["last"] = str(batch.first + 1_000)  # three events claiming a thousand numbers
    fields["mac"] = batch_mac(KEY, [fields[n].encode() for n in
                                    ("replica", "epoch", "first", "last", "events")]).hex()
    before = _rejected(fleet, "impossible_range")
    _xadd(fleet, fields)
    fleet.wait(lambda: _rejected(fleet, "impossible_range") == before + 1, "refused")
    _settled(fleet)


def test_a_signed_jump_far_ahead_is_a_gap_resynced_from_the_snapshot(fleet: Fleet) -> None:
    holder, _ = _holder(fleet, SYSTEM + "before the jump")
    view_seq = _views(fleet.router)[fleet.replicas[holder].settings.events.replica_id][1]
    jump = _batch(fleet, holder, [("stored", secrets.token_bytes(16), "device")],
                  first=view_seq + 1_000_000)
    gaps = fleet.router.router.index.gaps
    _xadd(fleet, jump.fields(KEY))
    fleet.wait(lambda: fleet.router.router.index.gaps > gaps, "the jump seen as a gap")
    _settled(fleet)  # the snapshot replaced the view; the jump's event is not in it
    after, hashes = _holder(fleet, SYSTEM + "after the jump")
    assert fleet.router.router.index.cached_blocks(
        fleet.replicas[after].settings.events.replica_id, hashes) == len(hashes)


def test_signed_events_the_replica_never_made_are_found_and_undone(fleet: Fleet) -> None:
    """With the secret leaked, batches at the next numbers are accepted: the replica's
    own event number (its load report) shows the view ran ahead of it, and the view is
    rebuilt from the replica's snapshot."""
    content = SYSTEM + "the victim, with a leaked secret"
    holder, hashes = _holder(fleet, content)
    other = 1 - holder
    ahead = _metric(fleet.router, "kvgate_router_view_ahead_total")
    _xadd(fleet, _batch(fleet, other, [("stored", h, "device") for h in hashes]).fields(KEY))
    _xadd(fleet, _batch(fleet, holder, [("removed", h, "device") for h in hashes]).fields(KEY))
    fleet.wait(lambda: _metric(fleet.router, "kvgate_router_view_ahead_total") >= ahead + 2,
               "both views found ahead of their replicas")
    _settled(fleet)
    index = fleet.router.router.index
    assert index.cached_blocks(fleet.replicas[holder].settings.events.replica_id, hashes) == len(hashes)
    assert index.cached_blocks(fleet.replicas[other].settings.events.replica_id, hashes) == 0
    assert _metric(fleet.router, "kvgate_router_reconcile_differences_total") >= 2 * len(hashes)
    assert _cached_tokens(fleet, content) >= (len(hashes) - 1) * 16


def test_events_lost_with_no_later_batch_are_found_from_the_replicas_own_number(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last batches lost (Redis dropped them, or the stream cannot be written) and the
    replica idle afterwards: no later batch shows a gap, but the replica's load report
    does."""
    monkeypatch.setattr(route_app, "LAG_S", 1.0)  # behind for a second, not five: lost
    _holder(fleet, SYSTEM + "before the loss")
    index = fleet.replicas[0].state.engine.store.index
    sink = index.on_event
    index.on_event = None  # its events from now on go nowhere
    try:
        direct = requests.post(fleet.replicas[0].url + "/v1/chat/completions",
                               headers=fleet.tenant.headers, timeout=60,
                               json={"model": "demo", "max_tokens": 4, "messages": [
                                   {"role": "user", "content": SYSTEM + "lost events"}]})
        assert direct.status_code == 200
        fleet.wait(lambda: _metric(fleet.router, "kvgate_router_view_behind_total") >= 1,
                   "the view found behind its replica")
        _settled(fleet)
    finally:
        index.on_event = sink
    after, hashes = _holder(fleet, SYSTEM + "after the loss")
    assert fleet.router.router.index.cached_blocks(
        fleet.replicas[after].settings.events.replica_id, hashes) == len(hashes)


# -- reconciliation --------------------------------------------------------------------------

def test_reconciliation_finds_and_repairs_what_a_view_lost_or_gained(fleet: Fleet) -> None:
    _holder(fleet, SYSTEM + "reconciled")
    router = RouterThread(db=fleet.router.settings.routing.db, admin_key=ADMIN_KEY,
                          replicas=[r.url for r in fleet.replicas], events_url=fleet.events_url,
                          reconcile_interval_s=0.2).start()
    try:
        fleet.wait(lambda: _exact(fleet, router), "the second router's views")
        rid = fleet.replicas[0].settings.events.replica_id

        async def damage() -> None:  # as a lost event and a forged one would leave it
            view = router.router.index.views[rid]
            if view.blocks:
                view.blocks.pop(next(iter(view.blocks)))
            view.blocks[b"\x00" * 16] = "device"

        router.on_loop(damage())
        fleet.wait(lambda: _metric(router, "kvgate_router_reconcile_differences_total") >= 1
                   and _exact(fleet, router), "the damage found and repaired")
    finally:
        router.stop()


def test_reconciliation_under_load_finds_no_difference(fleet: Fleet) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            try:
                assert fleet.chat(SYSTEM + f"busy {k} " * (k % 5 + 1)).status_code == 200
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        router = fleet.router.router
        for _ in range(4):
            for replica in list(router.pool.healthy()):
                fleet.router.on_loop(router.reconcile(replica))
    finally:
        stop.set()
        thread.join(60)
    assert not errors
    assert _metric(fleet.router, "kvgate_router_reconciles_total") >= 8
    assert router.compared >= 4  # most found their events in time and were compared
    assert router.differences == 0
    assert _metric(fleet.router, "kvgate_router_reconcile_differences_total") == 0
    _settled(fleet)


# -- the entry check itself ------------------------------------------------------------------

def _fields(batch: EventBatch, key: bytes | None) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in batch.fields(key).items()}


def test_verify_refuses_each_kind_of_bad_entry() -> None:
    events = [CacheEvent(5 + k, "stored", "ns", bytes([k]) * 16, "device") for k in range(3)]
    good = EventBatch("r0", "e", 5, 7, events)
    assert verify(_fields(good, KEY), KEY) == good
    assert verify(_fields(good, None), None) == good  # --events-unsigned
    assert verify(_fields(good, KEY), None) == good  # a MAC the router cannot check
    cases: list[tuple[dict[bytes, bytes], str]] = [
        (_fields(good, None), "unsigned"),
        (_fields(good, WRONG), "bad_signature"),
        ({**_fields(good, KEY), b"mac": b"zz"}, "bad_signature"),
        ({**_fields(good, KEY), b"first": b"4"}, "bad_signature"),
        ({**_fields(good, KEY), b"events": b"[]"}, "bad_signature"),
        ({k: v for k, v in _fields(good, KEY).items() if k != b"epoch"}, "malformed"),
    ]
    for fields, reason in cases:
        with pytest.raises(Rejected) as caught:
            verify(fields, KEY)
        assert caught.value.reason == reason, fields
    big = [CacheEvent(1 + k, "removed", "ns", bytes(16), "device") for k in range(MAX_BATCH + 1)]
    for bad in (EventBatch("r0", "e", 1, MAX_BATCH + 1, big),
                EventBatch("r0", "e", 5, 9, events),
                EventBatch("r0", "e", 0, 2, events)):
        with pytest.raises(Rejected) as caught:
            verify(_fields(bad, KEY), KEY)
        assert caught.value.reason == "impossible_range" and caught.value.replica == "r0"
        with pytest.raises(Rejected) as caught:  # unsigned mode: refused, but not trusted
            verify(_fields(bad, None), None)
        assert caught.value.replica is None
    raw = _fields(good, None)
    for junk in (b"[" * 100_000, b'{"a": 1}', b"null", b'[["q", "ns", "00", "d"]]'):
        with pytest.raises(Rejected) as caught:
            verify({**raw, b"events": junk}, None)
        assert caught.value.reason == "malformed"


# -- no secret ---------------------------------------------------------------------------------

def test_events_without_a_secret_refuse_to_start_unless_the_operator_opts_out(
        tmp_path: Path) -> None:
    url = "redis://127.0.0.1:9/0"
    with pytest.raises(EventsMisconfigured, match="KVGATE_EVENTS_SECRET"):
        create_router_app(RouterSettings.from_env({}, events_url=url, admin_key=ADMIN_KEY,
                                                  replicas=["http://127.0.0.1:9"]))
    create_router_app(RouterSettings.from_env({}, events_url=url, admin_key=ADMIN_KEY,
                                              events_unsigned=True,
                                              replicas=["http://127.0.0.1:9"]))  # a loud warning
    shared = RouterSettings.from_env({"KVGATE_SHARED_TIER_SECRET": "s"})
    assert shared.events.events_secret == "s"
    assert RouterSettings.from_env({"KVGATE_SHARED_TIER_SECRET": "s", "KVGATE_EVENTS_SECRET":
                                    "e"}).events.events_secret == "e"
    from kvgate.gateway.http.app import create_app

    base = server_settings(tmp_path, events_url=url, events_secret=None)
    with pytest.raises(EventsMisconfigured):
        create_app(base)
    for ok in ({"events_unsigned": True}, {"shared_tier_secret": "shared"}):
        create_app(updated(base, **ok))
    env = {k: v for k, v in os.environ.items()
           if k not in ("KVGATE_EVENTS_SECRET", "KVGATE_SHARED_TIER_SECRET")}
    env["KVGATE_ADMIN_KEY"] = ADMIN_KEY
    for args in (["route", "--replica", "http://127.0.0.1:9", "--events-url", url],
                 ["serve", "--model", "demo", "--port", "0", "--events-url", url,
                  "--db", f"sqlite:///{tmp_path / 'cli.db'}"]):
        done = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert "KVGATE_EVENTS_SECRET" in done.stderr and "--events-unsigned" in done.stderr
        assert not (tmp_path / "cli.db").exists()  # refused before anything was made



# -- a replica's load report -------------------------------------------------------------------

@pytest.mark.parametrize("report", [[1, 2], "text", {"queue_depth": "many"},
                                    {"block_size": None}, {"event_seq": "x", "epoch": "e"}])
async def test_a_load_report_of_the_wrong_shape_never_ends_the_poll_loop(report: Any) -> None:
    import aiohttp
    from aiohttp import web

    from kvgate.gateway.route.pool import ReplicaPool

    async def load(request: web.Request) -> web.Response:
        return web.json_response(report)

    app = web.Application()
    app.router.add_get("/admin/load", load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    epochs: list[str] = []

    async def new_epoch(replica: Any) -> None:
        epochs.append(replica.epoch)

    try:
        async with aiohttp.ClientSession() as session:
            pool = ReplicaPool([f"http://127.0.0.1:{port}"], ADMIN_KEY, session, new_epoch)
            (replica,) = pool.replicas.values()
            await pool.poll(replica)  # never raises
            if isinstance(report, dict) and "event_seq" in report:
                assert replica.healthy and replica.event_seq is None  # an older replica
            else:
                assert not replica.healthy
            await pool.close()
    finally:
        await runner.cleanup()
