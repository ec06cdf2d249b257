"""The engine core process: the model, the scheduler and the cache store, and nothing else.

``python -m kvgate.gateway.engine.core`` reads its start order (a pickle: the
``EngineConfig``, the socket path, the channel key, the parent's pid, the log level) from
stdin, loads the engine, writes ``ready`` (or ``error <kind> <message>``) as one line on
stdout, and serves API servers on the socket (``channel.py``) until its parent exits or it
is told to stop. HTTP, rendering, tokenizing and the ledger stay in the API servers
(``client.EngineClient``): the engine thread shares this process's GIL only with the few
microseconds per step it takes to hand a step's events to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvgate.gateway import loop
from kvgate.gateway.engine.channel import (
    CALLS,
    ChannelClosed,
    Message,
    challenge,
    frame,
    read_frame,
)
from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.request import (
    EngineEvent,
    ErrorEvent,
    FinishEvent,
    GenerateRequest,
    TokenEvent,
    WireError,
)
from kvgate.gateway.engine.sequence import Flow

log = logging.getLogger("kvgate.engine.core")

SEND_TIMEOUT_S = 30.0


@dataclass
class _Conn:
    """One API server's connection and the requests it has open here."""

    sock: socket.socket  # a duplicate of the connection's: written by the engine thread only
    out: deque[Message] = field(default_factory=deque)  # appended by any thread
    flows: dict[str, Flow] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)  # request id -> finishes to come
    cancelled: set[str] = field(default_factory=set)  # cancelled while being submitted
    adds: int = 0
    figures: tuple[int, int, int] = (0, 0, 0)  # the last sent: waiting, running, adds
    dead: bool = False


class Core:
    """Serves one engine to any number of API server connections."""

    def __init__(self, engine: Engine, key: bytes) -> None:
        self.engine = engine
        self.key = key
        self.loop = asyncio.get_running_loop()
        self._conns: tuple[_Conn, ...] = ()  # replaced, never changed: read by the engine thread
        self._sink: _Conn | None = None  # the connection that takes cache events
        self._tasks: set[asyncio.Task[None]] = set()
        engine.after_step = self._after_step
        tok = engine.tokenizer
        self.info: dict[str, Any] = {
            "model_id": engine.model_id, "model_info": engine.model_info,
            "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
            "block_size": engine.block_size, "page_bytes": engine.page_bytes,
            "device_pages": engine.scheduler.num_device_pages,
            "tier_bytes": engine.tier_bytes(), "tokenizer": tok, "pid": os.getpid(),
            "grammar_vocab": max(engine.vocab_size, tok.vocab_size),
        }

    # -- the engine thread ------------------------------------------------------------

    def _after_step(self) -> None:
        """Send each connection what the engine emitted since the last step, and the step's
        figures, as one frame written from this thread: no hand-off to the event loop
        (which would wait for the GIL while the next step runs). Figures that changed go
        out on their own too: requests that do not stream emit nothing until they end, and
        an API server that heard nothing would count them as waiting still (and refuse
        new requests as overloaded)."""
        waiting, running = self.engine.queue_depth(), self.engine.num_running()
        for conn in self._conns:
            if conn.dead or (not conn.out and conn.figures == (waiting, running, conn.adds)):
                continue
            conn.figures = (waiting, running, conn.adds)
            items: list[Message] = []
            while conn.out:
                msg = conn.out.popleft()
                if msg[0] in ("ev", "err"):  # "tok" ends nothing
                    self._account(conn, msg[1], msg[2])
                items.append(msg)
            items.append(("fig", waiting, running, conn.adds))
            try:
                _send_all(conn.sock, frame(items))
            except OSError:  # it went away; its reader cleans up
                conn.dead = True

    @staticmethod
    def _account(conn: _Conn, rid: str, ev: EngineEvent | WireError) -> None:
        if isinstance(ev, FinishEvent):
            conn.left[rid] = conn.left.get(rid, 1) - 1
            if conn.left[rid] > 0:
                return
        elif not isinstance(ev, WireError):
            return
        conn.left.pop(rid, None)
        conn.flows.pop(rid, None)
        conn.cancelled.discard(rid)

    async def connection(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if not await challenge(reader, writer, self.key):
            log.warning("refused a connection that did not know the channel key")
            writer.close()
            return
        raw = writer.get_extra_info("socket")
        conn = _Conn(socket.socket(fileno=os.dup(raw.fileno())))
        conn.out.append(("hello", self.info))
        self._conns = (*self._conns, conn)
        self.engine.nudge()  # the engine thread sends it (it may be idle)
        try:
            while True:
                for msg in await read_frame(reader):
                    self._handle(conn, msg)
        except ChannelClosed:
            pass
        finally:
            self._conns = tuple(c for c in self._conns if c is not conn)
            if self._sink is conn:
                self._sink = None
                self.engine.set_event_sink(None)
            conn.dead = True
            for rid in list(conn.left):  # its clients are gone with it
                self.engine.cancel(rid)
            writer.close()
            self.engine.run_soon(conn.sock.close)  # on the thread that writes it

    def _handle(self, conn: _Conn, msg: Message) -> None:
        kind = msg[0]
        if kind == "read":
            flow = conn.flows.get(msg[1])
            if flow is not None:
                flow.consumed += msg[2]
        elif kind == "add":
            request: GenerateRequest = msg[1]
            conn.adds += 1
            conn.left[request.request_id] = request.sampling.n
            self._spawn(self._add(conn, request))
        elif kind == "cancel":
            rid = msg[1]
            if rid in conn.left and rid not in conn.flows:
                conn.cancelled.add(rid)  # still being submitted: cancelled once queued
            self.engine.cancel(rid)
        elif kind == "call":
            self._spawn(self._call(conn, msg[1], msg[2], msg[3]))
        else:
            log.warning("unknown message %r", kind)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add(self, conn: _Conn, request: GenerateRequest) -> None:
        rid = request.request_id

        def emit(ev: EngineEvent) -> None:
            if isinstance(ev, ErrorEvent):  # an exception pickles only as what rebuilds it
                conn.out.append(("err", rid, WireError.of(ev.error), ev.usage))
            elif (isinstance(ev, TokenEvent) and ev.prompt_usage is None
                  and ev.logprobs is None):  # the usual token: plain values pickle 5x faster
                conn.out.append(("tok", rid, ev.text, ev.token_ids, ev.index, ev.final))
            else:
                conn.out.append(("ev", rid, ev))

        try:
            flow = await self.engine.submit(request, emit)
        except Exception as exc:  # the checks' refusals: the client raises them
            emit(ErrorEvent(exc))
            self.engine.nudge()  # the engine thread sends it (it may be idle)
            return
        if rid in conn.left:
            conn.flows[rid] = flow
        if rid in conn.cancelled or conn.dead:  # cancelled, or its server went, meanwhile
            self.engine.cancel(rid)

    async def _call(self, conn: _Conn, call_id: int | None, name: str,
                    args: tuple[Any, ...]) -> None:
        try:
            if name not in CALLS:
                raise ValueError(f"no engine call {name!r}")
            if name == "figures":
                result: Any = (self.engine.cache_stats(), self.engine.scheduling())
            elif name == "events":
                self._sink = conn if args[0] else None
                self.engine.set_event_sink(
                    (lambda ev: conn.out.append(("cache", ev))) if args[0] else None)
                result = None
            else:
                result = getattr(self.engine, name)(*args)
                if asyncio.iscoroutine(result):
                    result = await result
        except Exception as exc:
            if call_id is None:
                log.exception("engine call %s failed", name)
                return
            conn.out.append(("ret", call_id, False, WireError.of(exc)))
        else:
            if call_id is None:
                return
            conn.out.append(("ret", call_id, True, result))
        self.engine.nudge()  # the engine thread sends it (it may be idle)


def _send_all(sock: socket.socket, data: bytes) -> None:
    """The whole frame, on a socket the event loop made non-blocking. A peer that takes
    nothing for ``SEND_TIMEOUT_S`` is given up on (``TimeoutError``, an ``OSError``)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            if not select.select([], [sock], [], SEND_TIMEOUT_S)[1]:
                raise TimeoutError("the API server took no bytes") from None


async def serve(config: EngineConfig, path: str, key: bytes, parent: int) -> int:
    try:
        engine = Engine(config)
    except Exception as exc:
        log.debug("the engine did not load", exc_info=True)
        sys.stdout.write(f"error {WireError.of(exc).line()}\n")
        sys.stdout.flush()
        return 2
    await engine.start()
    core = Core(engine, key)
    old = os.umask(0o177)  # the socket: its owner only
    try:
        server = await asyncio.start_unix_server(core.connection, path=path,
                                                 limit=1 << 20)
    finally:
        os.umask(old)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the API server died while this core started: nobody to serve
        stop.set()
    os.dup2(2, 1)  # nobody reads the pipe from now on: later prints go to the log
    while not stop.is_set() and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    server.close()
    await engine.stop()
    with contextlib.suppress(OSError):  # the socket and its private directory
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    return 0


def main() -> int:
    order = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=order["log_level"],
                        format="%(asctime)s %(levelname)s %(name)s [core] %(message)s")
    return loop.run(serve(order["config"], order["path"], order["key"], order["parent"]),
                    order.get("event_loop", "asyncio"))


if __name__ == "__main__":
    sys.exit(main())
