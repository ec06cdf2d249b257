"""The engine core process under faults a tenant or an operator can bring about.

A core killed while requests of every shape are in flight (several prompts, an explicit
cache), a core killed while the server stops, its socket directory removed, requests that
do not stream (which emit nothing until they end) filling the queue figures: each request
is answered, billed once for what it used, and no core process is left behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from kvgate.gateway.engine.client import EngineClient
from testkit import MiB, ThreadServer
from testkit.core import client_of, wait_until


def cores() -> set[int]:
    """The engine core processes this process started that still run (read from /proc:
    ``ps`` cuts long command lines to its width), every server's of this test session."""
    found = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command's name
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # it exited meanwhile
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == me and state != "Z" and b"kvgate.gateway.engine.core" in cmdline:
            found.add(int(entry))
    return found


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("attack"), api_servers=1,
                      device_cache_bytes=16 * MiB) as server:
        yield server


@pytest.fixture
def srv(shared: ThreadServer) -> ThreadServer:
    """The module's server, its core up (a test before may have just killed it)."""
    wait_until(lambda: client_of(shared).up)
    return shared


def restarts(srv: ThreadServer) -> int:
    return client_of(srv).restarts


def test_several_prompts_cut_by_a_dead_core_are_billed_for_every_prompt(
        srv: ThreadServer) -> None:
    base = restarts(srv)
    tenant = srv.admin.tenant("prompts")
    engine = client_of(srv)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    prompts = ["one two three four five six seven",
               "alpha beta gamma delta epsilon zeta eta theta iota kappa",
               "red green blue"]
    pid = int(engine.info["pid"])
    seen: set[int] = set()
    got = 0
    with pytest.raises(openai.APIError):
        for chunk in client.completions.create(
                model="demo", prompt=prompts, max_tokens=4000, stream=True,
                extra_body={"ignore_eos": True}):
            seen.update(c.index for c in chunk.choices)
            got += 1
            if len(seen) == 3 and got >= 30:
                os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(srv.ledger_rows(tenant.id)) == 1)
    row = next(iter(srv.ledger_rows(tenant.id).values()))
    assert row["n"] == 1 and row["status"] == "error"
    # every prompt ran and was seen: the bill counts all three, not the one that ended first
    wait_until(lambda: engine.restarts == base + 1)
    whole = client.completions.create(model="demo", prompt=prompts, max_tokens=1)
    assert row["prompt_tokens"] == whole.usage.prompt_tokens
    assert row["completion_tokens"] >= got


def test_requests_that_do_not_stream_are_not_counted_as_waiting(tmp_path: Path) -> None:
    """They emit nothing until they end: the core's figures must still reach the API
    server, or it takes running requests for queued ones and refuses new ones (503)."""
    with ThreadServer(tmp_path, api_servers=1, device_cache_bytes=16 * MiB,
                      max_queue=2) as srv:
        tenant = srv.admin.tenant("quiet")
        engine = client_of(srv)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0,
                               timeout=300)
        results: list[Any] = []

        def long_one() -> None:
            try:
                results.append(client.chat.completions.create(
                    model="demo", max_tokens=600, extra_body={"ignore_eos": True},
                    messages=[{"role": "user", "content": "Talk at length."}]))
            except Exception as exc:
                results.append(exc)

        threads = [threading.Thread(target=long_one) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: engine._adds == 2 or len(results) > 0)
        # the core runs both (asked on a connection of its own, which leaves this one's
        # figures alone): this server must learn that without asking
        other = EngineClient(engine.config, spawn=False, path=engine.path, key=engine.key)
        srv.on_loop(other.start())
        try:
            wait_until(lambda: srv.on_loop(other.load())["running"] == 2 or len(results) > 0)
            wait_until(lambda: engine.queue_depth() == 0 or len(results) > 0, 60)
            assert not results, "the two long requests ended before the figures were read"
            assert engine.queue_depth() == 0 and engine.num_running() == 2
            third = client.chat.completions.create(
                model="demo", max_tokens=2, messages=[{"role": "user", "content": "hi"}],
                extra_body={"ignore_eos": True})
            assert third.usage.completion_tokens == 2
        finally:
            srv.on_loop(other.stop())
            for t in threads:
                t.join(300)
        assert all(not isinstance(r, Exception) for r in results), results


def test_a_core_killed_while_the_server_stops_is_not_left_running(tmp_path: Path) -> None:
    others = cores()  # other servers' of this session
    srv = ThreadServer(tmp_path, api_servers=1, device_cache_bytes=16 * MiB).start()
    try:
        engine = client_of(srv)
        first = int(engine.info["pid"])
        assert cores() - others == {first}, _ps()
        os.kill(first, signal.SIGKILL)
        # the server stops while its new core is still loading
        wait_until(lambda: bool(cores() - others - {first}))
    finally:
        srv.stop()
    assert not cores() - others, _ps()  # stopped with the server, not left to find its parent gone


def _ps() -> str:
    return subprocess.run(["ps", "-ww", "-o", "pid=,stat=,etime=,args=", "--ppid", str(os.getpid())],
                          capture_output=True, text=True, check=False).stdout


def test_a_core_killed_twice_in_a_row_comes_back(srv: ThreadServer) -> None:
    base = restarts(srv)
    engine = client_of(srv)
    tenant = srv.admin.tenant("twice")
    first = int(engine.info["pid"])
    others = cores() - {first}  # other servers' of this session
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: bool(cores() - others - {first}))
    for pid in cores() - others - {first}:
        os.kill(pid, signal.SIGKILL)  # the new one dies too, while it loads
    wait_until(lambda: engine.up and engine.restarts == base + 1)
    wait_until(lambda: cores() - others == {int(engine.info["pid"])}, 30)
    assert requests.get(srv.url + "/readyz", timeout=30).status_code == 200
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    assert client.chat.completions.create(
        model="demo", max_tokens=3, messages=[{"role": "user", "content": "ok?"}],
        extra_body={"ignore_eos": True}  # the demo's random weights may sample their end
    ).usage.completion_tokens == 3


def test_a_removed_socket_directory_does_not_keep_the_core_down(srv: ThreadServer) -> None:
    base = restarts(srv)
    engine = client_of(srv)
    tenant = srv.admin.tenant("tmpclean")
    assert engine.path is not None
    old_dir = os.path.dirname(engine.path)
    others = cores() - {int(engine.info["pid"])}  # other servers' of this session
    shutil.rmtree(old_dir)  # a temp cleaner, or an operator tidying up
    os.kill(int(engine.info["pid"]), signal.SIGKILL)
    wait_until(lambda: engine.restarts == base + 1, 60)
    assert os.path.dirname(engine.path) != old_dir
    assert os.stat(os.path.dirname(engine.path)).st_mode & 0o077 == 0
    wait_until(lambda: cores() - others == {int(engine.info["pid"])}, 30)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    assert client.chat.completions.create(
        model="demo", max_tokens=3, messages=[{"role": "user", "content": "ok?"}],
        extra_body={"ignore_eos": True}  # the demo's random weights may sample their end
    ).usage.completion_tokens == 3


def test_a_directory_put_in_place_of_the_socket_directory_is_not_used(
        srv: ThreadServer) -> None:
    base = restarts(srv)
    engine = client_of(srv)
    assert engine.path is not None
    old_dir = os.path.dirname(engine.path)
    shutil.rmtree(old_dir)
    os.mkdir(old_dir, 0o755)  # anyone could have made it: its mode lets others in
    try:
        os.kill(int(engine.info["pid"]), signal.SIGKILL)
        wait_until(lambda: engine.restarts == base + 1, 60)
        assert os.path.dirname(engine.path) != old_dir
    finally:
        shutil.rmtree(old_dir, ignore_errors=True)


def test_a_pin_cut_by_a_dead_core_is_not_pinned_by_the_next(srv: ThreadServer) -> None:
    base = restarts(srv)
    engine = client_of(srv)

    async def pin_while_dying() -> BaseException | None:
        assert engine.proc is not None
        call = asyncio.ensure_future(engine.pin("tenant:999", list(range(1, 64)), "cache_x"))
        await asyncio.sleep(0)
        engine.proc.kill()
        try:
            await call
        except BaseException as exc:
            return exc
        return None

    failed = srv.on_loop(pin_while_dying())
    if failed is None:  # the core pinned it before it died: then it stands, as it should
        pytest.skip("the pin was answered before the core died")
    assert ("pin", "tenant:999", "cache_x") not in engine._standing
    wait_until(lambda: engine.restarts == base + 1)
    assert srv.on_loop(engine.pinned_blocks("tenant:999")) == 0


def test_the_reservation_biller_outlives_a_core_that_is_down(srv: ThreadServer) -> None:
    """Its first read of the engine's reservations, made while the core restarts, must
    not end it (no reservation billed for the server's life) nor, at shutdown, raise
    past the cleanup that stops the core and closes the ledger."""
    base = restarts(srv)
    from kvgate.gateway.http.reservations import ReservationBiller

    engine = client_of(srv)

    async def start_while_down() -> tuple[bool, BaseException | None]:
        assert engine.proc is not None
        engine.proc.kill()
        while engine.up:
            await asyncio.sleep(0.01)
        biller = ReservationBiller(srv.state, "demo")
        biller.start()
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert biller._task is not None
        alive = not biller._task.done()
        try:
            await biller.stop()
        except BaseException as exc:
            return alive, exc
        return alive, None

    alive, raised = srv.on_loop(start_while_down())
    assert alive and raised is None
    wait_until(lambda: engine.restarts == base + 1)


def test_streams_cut_by_a_dead_core_say_so_and_are_billed_once(srv: ThreadServer) -> None:
    """n=3 through the OpenAI SDK, a message stream through Anthropic's: each ends with the
    API's engine_unavailable error (not an internal error), one error row each."""
    base = restarts(srv)
    import anthropic

    tenant = srv.admin.tenant("streams")
    engine = client_of(srv)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    # Killed early in each stream: a client that reads slowly gets its tokens coalesced
    # (up to --max-unread-tokens a chunk), so a whole answer can be fewer chunks than a
    # later kill would wait for, and end before it.
    got = 0
    with pytest.raises(openai.APIError) as cut:
        for chunk in client.chat.completions.create(
                model="demo", max_tokens=4000, n=3, stream=True,
                extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": "Talk."}]):
            got += len(chunk.choices)
            if got == 6:  # past each choice's first chunk
                os.kill(int(engine.info["pid"]), signal.SIGKILL)
    assert "engine" in str(cut.value) and "Internal server error" not in str(cut.value)
    wait_until(lambda: engine.restarts == base + 1)
    ant = anthropic.Anthropic(base_url=srv.url, api_key=tenant.key, max_retries=0)
    events = 0
    # greedy: Anthropic's API has no ignore_eos, and a sampled answer of the demo's random
    # weights may end (end_turn) within the few tokens the kill takes to land
    with pytest.raises(anthropic.APIError) as cut_ant, ant.messages.stream(
            model="demo", max_tokens=4000, messages=[{"role": "user", "content": "Talk."}],
            extra_body={"temperature": 0}) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                events += 1
                if events == 1:
                    os.kill(int(engine.info["pid"]), signal.SIGKILL)
    assert "Internal server error" not in str(cut_ant.value)
    wait_until(lambda: engine.restarts == base + 2)
    rows = srv.ledger_rows(tenant.id)
    assert len(rows) == 2
    assert all(r["n"] == 1 and r["status"] == "error" and 0 < r["completion_tokens"] < 12000
               for r in rows.values())
    assert requests.get(srv.url + "/readyz", timeout=30).status_code == 200


def test_a_frame_that_does_not_decode_restarts_the_core(srv: ThreadServer) -> None:
    """A frame the client cannot read leaves the stream out of step: it must not leave the
    server waiting forever on a reader that died; the core is started again."""
    base = restarts(srv)
    engine = client_of(srv)
    old = int(engine.info["pid"])

    async def garble() -> None:
        assert engine._reader is not None
        engine._reader.feed_data(b"\0\0\0\x03abc")  # a length, then no pickle

    srv.on_loop(garble())
    wait_until(lambda: engine.up and engine.restarts == base + 1)
    assert int(engine.info["pid"]) != old
    tenant = srv.admin.tenant("garbled")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
    assert client.chat.completions.create(
        model="demo", max_tokens=3, messages=[{"role": "user", "content": "ok?"}],
        extra_body={"ignore_eos": True}  # the demo's random weights may sample their end
    ).usage.completion_tokens == 3
