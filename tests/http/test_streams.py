"""Streams that end badly, seen on the wire: an engine failure after the first byte ends the
stream with one error event in the API's shape and closes the connection (never a second
HTTP response inside the chunked body); a client that hangs up on a request that does not
stream stops the engine; either way the ledger bills what was produced, with the prompt's
real cache split. And Anthropic stop sequences say which one matched."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import anthropic
import openai
import pytest

from kvgate.gateway.protocol.namespace import tenant_namespace
from testkit import Admin, Tenant, ThreadServer, request_body

# Long enough to span many cache blocks, so a cached prompt is cheap to tell apart.
DOCUMENT = ("A long shared document that the tenant sends again and again; its blocks are "
            "cached after the first request, and only its tail is computed later. ") * 8
FAIL_AT = 3  # output tokens made before the injected failure


class Faults:
    """Wraps the engine's model runner, for one tenant's requests only: fail them once they
    have ``fail_at`` output tokens and have sent some text (``failed_at``: their output
    tokens then), or slow each step of theirs by ``delay_s``; ``started`` is set once they
    have made ``started_at`` tokens."""

    def __init__(self, server: ThreadServer, tenant: Tenant, *, fail_at: int | None = None,
                 delay_s: float = 0.0, started_at: int = 1) -> None:
        self.engine = server.state.engine
        self.namespace = tenant_namespace(tenant.id)
        self.fail_at, self.delay_s, self.started_at = fail_at, delay_s, started_at
        self.started = threading.Event()
        self.failed_at: int | None = None
        self._run: Callable[..., Any] = self.engine.runner.run

    def _sent_text(self, seq: Any) -> bool:
        """Some of the output's text has gone out: its decode has a character before the
        incomplete ones the detokenizer holds back (the text is made where the events are
        read, not in the engine)."""
        return bool(self.engine.tokenizer.decode(seq.output_ids).rstrip("\ufffd"))

    def run(self, chunks: list[Any]) -> Any:
        mine = [c.seq for c in chunks if c.seq.request.namespace == self.namespace]
        if any(seq.num_output >= self.started_at for seq in mine):
            self.started.set()
        for seq in mine:
            if self.fail_at is not None and seq.num_output >= self.fail_at \
                    and self._sent_text(seq):  # random bytes may take a while to be text
                self.failed_at = seq.num_output
                raise RuntimeError("injected engine failure")
        if mine and self.delay_s:
            time.sleep(self.delay_s)
        return self._run(chunks)


@pytest.fixture()
def faults(server: ThreadServer, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[Callable[..., Faults]]:
    """Installs ``Faults`` for a tenant; no end-of-sequence token while it is installed,
    so the random demo model never stops before the test has what it needs."""
    def install(tenant: Tenant, **kw: Any) -> Faults:
        f = Faults(server, tenant, **kw)
        monkeypatch.setattr(server.state.engine.runner, "run", f.run)
        monkeypatch.setattr(server.state.engine.tokenizer, "eos_token_ids", [])
        return f

    yield install


def _connect(url: str, path: str, body: dict, headers: dict[str, str]) -> socket.socket:
    """A keep-alive HTTP/1.1 request on a raw socket, so the test sees every byte."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: keep-alive",
            "Content-Type: application/json", f"Content-Length: {len(payload)}",
            *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


def _read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with sock:
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError("the server left the connection open after the stream "
                                     f"ended; received so far:\n{data.decode(errors='replace')}"
                                     ) from None
            if not chunk:
                return data
            data += chunk


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2:]
    raise AssertionError("the chunked body has no terminating chunk")


def _events(stream: bytes) -> list[tuple[str | None, str]]:
    events = []
    for block in stream.decode().split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            events.append((name, "\n".join(data)))
    return events


def _row(server: ThreadServer, tenant: Tenant, request_id: str) -> dict[str, Any]:
    """The request's ledger row, once its commit has landed."""
    for _ in range(300):
        row = server.ledger_rows(tenant.id).get(request_id)
        if row is not None:
            return row
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} was never billed")


def _warm(server: ThreadServer, tenant: Tenant, kind: str, model: str) -> dict[str, Any]:
    """One request that writes DOCUMENT's blocks to the tenant's cache; its ledger row."""
    path, body = request_body(kind.removesuffix("-stream"), DOCUMENT, 1, model=model)
    sock = _connect(server.url, path, body, {**tenant.headers, "Connection": "close"})
    raw = _read_to_close(sock)
    head = raw.partition(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    request_id = next(line.split(":", 1)[1].strip() for line in head.splitlines()
                      if line.lower().startswith("x-request-id:"))
    return _row(server, tenant, request_id)


@pytest.mark.parametrize("kind", ["chat-stream", "completions-stream", "messages-stream"])
def test_engine_failure_mid_stream_ends_it_with_an_error_event_and_closes(
        server: ThreadServer, admin: Admin, model_id: str, kind: str,
        faults: Callable[..., Faults]) -> None:
    tenant = admin.tenant("midstream")
    warm = _warm(server, tenant, kind, model_id)
    f = faults(tenant, fail_at=FAIL_AT)
    path, body = request_body(kind, DOCUMENT, 64, model=model_id)
    raw = _read_to_close(_connect(server.url, path, body, tenant.headers))

    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 1, raw.decode(errors="replace")  # one response only
    assert head.startswith(b"HTTP/1.1 200")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert headers["Transfer-Encoding"] == "chunked"
    events = _events(_dechunk(chunked))
    name, data = events[-1]
    if kind.startswith("messages"):
        assert name == "error"
        error = json.loads(data)
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "message_stop" not in {n for n, _ in events}
    else:
        error = json.loads(data)
        assert set(error) == {"error"} and error["error"]["type"] == "server_error"
        assert "[DONE]" not in {d for _, d in events}
    assert error["error"]["message"]
    assert len(events) >= 2  # the stream had started: the failure came after its first byte

    row = _row(server, tenant, headers["x-request-id"])
    assert row["n"] == 1 and row["status"] == "error", row
    assert f.failed_at is not None and row["completion_tokens"] == f.failed_at >= FAIL_AT, row
    # Billed with the prompt's real cache split: DOCUMENT's blocks were read, not recomputed.
    block = server.settings.cache.block_size
    assert row["prompt_tokens"] == warm["prompt_tokens"]
    assert row["cached_tokens"] >= row["prompt_tokens"] - block, row
    assert row["cost_micros"] < warm["cost_micros"], (row, warm)


def test_sdks_raise_on_a_stream_that_fails_midway(server: ThreadServer, admin: Admin,
                                                 model_id: str,
                                                 faults: Callable[..., Faults]) -> None:
    tenant = admin.tenant("midstream-sdk")
    faults(tenant, fail_at=FAIL_AT)
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)
    seen = []
    with pytest.raises(openai.APIError, match="Internal server error"):
        for chunk in oai.chat.completions.create(
                model=model_id, max_tokens=64, stream=True,
                messages=[{"role": "user", "content": "fail me"}]):
            seen.append(chunk)
    assert seen  # it failed after the stream had begun
    ant = anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as err, ant.messages.stream(
            model=model_id, max_tokens=64,
            messages=[{"role": "user", "content": "fail me"}]) as stream:
        for _ in stream:
            pass
    assert err.value.body["error"]["type"] == "api_error"  # type: ignore[index]


@pytest.mark.parametrize("kind", ["chat", "messages"])
def test_client_leaving_a_plain_request_stops_the_engine(
        server: ThreadServer, admin: Admin, model_id: str, kind: str,
        faults: Callable[..., Faults]) -> None:
    """The engine sends a request that does not stream nothing until it ends; a client that
    hangs up meanwhile still stops it, and is billed for what it made, as cancelled."""
    tenant = admin.tenant("leaves")
    warm = _warm(server, tenant, kind, model_id)
    budget = 1500  # prompt and answer fit the test server's KV pool: only the client stops it
    f = faults(tenant, delay_s=0.01, started_at=2)
    path, body = request_body(kind, DOCUMENT, budget, model=model_id)
    before = set(server.ledger_rows(tenant.id))
    sock = _connect(server.url, path, body, tenant.headers)
    assert f.started.wait(60), "the engine never started the request"
    sock.close()  # the client hangs up while the engine is generating

    for _ in range(600):
        rows = {i: r for i, r in server.ledger_rows(tenant.id).items() if i not in before}
        if rows:
            break
        time.sleep(0.1)
    (row,) = rows.values()
    assert row["status"] == "cancelled", row
    assert 2 <= row["completion_tokens"] < budget, row
    block = server.settings.cache.block_size
    assert row["prompt_tokens"] == warm["prompt_tokens"]
    assert row["cached_tokens"] >= row["prompt_tokens"] - block, row
    engine = server.state.engine
    for _ in range(100):
        if engine.num_running() == 0 and engine.queue_depth() == 0:
            break
        time.sleep(0.1)
    assert engine.num_running() == 0 and engine.queue_depth() == 0


def _greedy(client: anthropic.Anthropic, model: str, text: str, **kw: Any) -> Any:
    return client.messages.create(model=model, max_tokens=24, extra_body={"temperature": 0},
                                  messages=[{"role": "user", "content": text}], **kw)


def test_anthropic_stop_sequence_is_reported(server: ThreadServer, tenant: Tenant,
                                             model_id: str, faults: Callable[..., Faults]
                                             ) -> None:
    faults(tenant)  # no end-of-sequence token: the greedy answer runs to max_tokens
    client = anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)
    full = _greedy(client, model_id, "Say something.").content[0].text
    # A stop string the greedy answer does produce: printable, after its first characters.
    start = next(i for i in range(2, len(full) - 2) if full[i:i + 2].isprintable())
    stop = full[start:start + 2]
    expected = full[:full.index(stop)]

    msg = _greedy(client, model_id, "Say something.", stop_sequences=["never-said", stop])
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == stop
    assert msg.content[0].text == expected

    with client.messages.stream(model=model_id, max_tokens=24, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Say something."}],
                                stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence"
    assert final.stop_sequence == stop
    assert "".join(b.text for b in final.content if b.type == "text") == expected

    plain = _greedy(client, model_id, "Say something.", stop_sequences=["never-said"])
    assert plain.stop_reason == "max_tokens" and plain.stop_sequence is None
