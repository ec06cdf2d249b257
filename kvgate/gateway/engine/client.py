"""The engine as an API server sees it when the engine core runs in a process of its own.

``EngineClient`` has the ``Engine`` facade the HTTP layer uses (``generate``, ``check``,
``render_chat``, the cache calls, the figures) and keeps here what needs no model: the
tokenizer (rendering, tokenizing, detokenizing logprobs), the grammar compiler (a bad
schema is refused before anything is queued) and the checks of a prompt's length and ids.
Requests and their events cross the channel (``channel.py``) batched per step and per turn
of the event loop.

One API server (the supervisor, ``spawn=True``) starts the core, and starts it again when
it dies: every request in flight then ends with ``EngineUnavailable`` carrying what it was
seen to use (its prompt's split from its first token, the tokens that reached it), so the
HTTP layer bills what was delivered once, as it does any failed request; new requests get a
503 until the core is back. What the API servers told the core that outlives a request
(quotas, reservations, pins, the cache-events subscription) is told again to a new core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import secrets
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from kvgate.cachestore.block import Tier
from kvgate.cachestore.events import CacheEventSink
from kvgate.cachestore.stats import CacheStats, HotPrefix
from kvgate.gateway import loop
from kvgate.gateway.engine.channel import ChannelClosed, Message, answer, frame, read_frame
from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.grammar import GrammarEngine
from kvgate.gateway.engine.request import (
    EngineError,
    EngineEvent,
    EngineMisconfigured,
    EngineUnavailable,
    ErrorEvent,
    FinishEvent,
    GenerateRequest,
    TokenEvent,
    check_request,
    read_events,
)
from kvgate.gateway.engine.tokenizer import TextStream, TextTokenizer
from kvgate.gateway.usage import Usage

log = logging.getLogger("kvgate.engine.client")

RESTART_DELAY_S = (0.5, 30.0)  # between failed starts of the core: first, doubling to
CLOSE_GRACE_S = 10.0  # a core that closed the channel has this long to exit by itself


def _exit(code: int) -> str:
    """How a process ended, in words (a negative code is the signal that killed it)."""
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class CoreFailedToStart(RuntimeError):
    """The engine core process exited before it was ready; the message is its reason."""


class _Stream:
    """One request's events, and what its reader has seen of it (for a bill if the core
    dies before the request ends)."""

    __slots__ = ("events", "prompt_usage", "tokens")

    def __init__(self) -> None:
        self.events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.prompt_usage: Usage | None = None
        self.tokens = 0

    def seen(self, ev: TokenEvent) -> None:
        if ev.prompt_usage is not None and self.prompt_usage is None:
            self.prompt_usage = ev.prompt_usage
        self.tokens += len(ev.token_ids)

    def usage(self) -> Usage | None:
        if self.prompt_usage is None:
            return None
        return dataclasses.replace(self.prompt_usage, completion_tokens=self.tokens)


class EngineClient:
    def __init__(self, config: EngineConfig, *, spawn: bool = True,
                 path: str | None = None, key: bytes | None = None) -> None:
        self.config = config
        self._spawning = spawn
        self._dir: str | None = None
        self.path = path
        self.key = key or secrets.token_bytes(32)
        self.proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.subprocess.Process | None = None  # not ready yet
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._up = False
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._out: list[Message] = []
        self._reads: dict[str, int] = {}
        self._flush_scheduled = False
        self._sink: CacheEventSink | None = None
        # told again to a new core: ("set_quota", ns) / ("set_reservation", ns) / ("pin", ns, key)
        self._standing: dict[tuple[str, ...], tuple[str, tuple[Any, ...]]] = {}
        # figures from the core's frames and calls
        self._waiting = self._running = 0
        self._adds = self._adds_seen = 0
        self._stats: CacheStats | None = None
        self._scheduling: dict[str, Any] = {}
        self.restarts = 0
        self.info: dict[str, Any] = {}
        self.remote = None  # the remote tiers live in the core

    # -- what the core told us at hello ----------------------------------------------

    def _adopt(self, info: dict[str, Any]) -> None:
        first = not self.info
        self.info = info
        if first:
            self.tokenizer: TextTokenizer = info["tokenizer"]
            self.model_id: str = info["model_id"]
            self.model_info: dict[str, Any] = info["model_info"]
            self.max_model_len: int = info["max_model_len"]
            self.vocab_size: int = info["vocab_size"]
            self.block_size: int = info["block_size"]
            self.page_bytes: int = info["page_bytes"]
            self.grammars = GrammarEngine(self.tokenizer.tokenizer.to_str(),
                                          self.tokenizer.eos_token_ids, info["grammar_vocab"],
                                          threads=self.config.threads())

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the core (when this client spawns it) and connect; again: nothing."""
        if self._task is not None:
            return
        if self._spawning:
            await self._spawn()
        await self._connect()
        self._task = asyncio.create_task(self._read_loop(), name="kvgate-engine-client")
        await self.refresh()

    def _private_dir(self) -> None:
        """A directory only this user can enter for the socket: made again when it went
        away (a temp cleaner, an operator), never one someone else made at its name."""
        if self._dir is not None:
            try:
                st = os.lstat(self._dir)
            except FileNotFoundError:
                pass
            else:
                if (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                        and st.st_mode & 0o077 == 0):
                    return
                log.error("the engine core's socket directory %s was replaced; using a new "
                          "one", self._dir)
        self._dir = tempfile.mkdtemp(prefix="kvgate-core-")  # mode 0700
        self.path = str(Path(self._dir) / "core.sock")

    async def _spawn(self) -> None:
        self._private_dir()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvgate.gateway.engine.core",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            # its own session: a terminal's Ctrl-C reaches the server, which drains its
            # requests before it stops the core (the core also exits when its parent does)
            start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        self._starting = proc  # stopped by stop() if this start is cut short
        order = {"config": self.config, "path": self.path, "key": self.key,
                 "parent": os.getpid(), "log_level": logging.getLogger().getEffectiveLevel(),
                 # the core runs the loop this process runs (``--event-loop``)
                 "event_loop": loop.running()}
        try:
            proc.stdin.write(pickle.dumps(order, protocol=5))
            await proc.stdin.drain()
            proc.stdin.close()
            line = (await proc.stdout.readline()).decode(errors="replace").strip()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            raise
        finally:
            self._starting = None
        if line != "ready":
            await proc.wait()
            kind, _, message = line.removeprefix("error ").partition(" ")
            if not line:
                raise CoreFailedToStart(
                    f"the engine core {_exit(proc.returncode or 0)} before it was ready (what "
                    "it said, if anything, is above in this log)")
            if kind in ("EngineMisconfigured", "ModelFilesMissing", "ValueError"):
                raise EngineMisconfigured(message)
            raise CoreFailedToStart(f"the engine core did not start: {kind}: {message}")
        self.proc = proc

    async def _connect(self) -> None:
        assert self.path is not None
        reader, writer = await asyncio.open_unix_connection(self.path, limit=1 << 20)
        await answer(reader, writer, self.key)
        hello = await read_frame(reader)
        if not hello or hello[0][0] != "hello":
            writer.close()
            raise ChannelClosed("the core did not say hello")
        self._adopt(hello[0][1])
        self._reader, self._writer = reader, writer
        self._adds = self._adds_seen = self._waiting = self._running = 0
        self._up = True
        if self._sink is not None:
            self._send(("call", None, "events", (True,)))
        for name, args in self._standing.values():
            self._send(("call", None, name, args))

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
        self._lost("the engine has stopped")
        await self._end_core()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _end_core(self) -> None:
        """Stop the core process this client started, if it still runs."""
        if self._spawning and self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def _read_loop(self) -> None:
        while not self._closing:
            assert self._reader is not None
            try:
                while True:
                    for msg in await read_frame(self._reader):
                        self._dispatch(msg)
            except ChannelClosed:
                pass
            except Exception:  # a frame that does not decode: the stream is out of step
                log.exception("the engine core's channel broke; starting the core again")
                if self._writer is not None:
                    self._writer.close()
                if self._spawning and self.proc is not None and self.proc.returncode is None:
                    self.proc.kill()
            if self._closing:
                return
            self._lost("the engine core stopped; retry the request")
            await self._recover()

    def _lost(self, why: str) -> None:
        """Every open request and call ends now, with what each was seen to use."""
        self._up = False
        for rid, st in list(self._streams.items()):
            st.events.put_nowait(ErrorEvent(EngineUnavailable(why), st.usage()))
            self._streams.pop(rid, None)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineUnavailable(why))
        self._calls.clear()
        self._out.clear()
        self._reads.clear()

    async def _recover(self) -> None:
        """Start the core again (the supervisor) or wait for it (the others), reconnect."""
        if self.proc is not None:
            try:  # it closed the channel: it is exiting, or it will not serve it again
                code = await asyncio.wait_for(self.proc.wait(), CLOSE_GRACE_S)
            except TimeoutError:
                log.error("the engine core closed its channel but still runs; stopping it")
                self.proc.kill()
                code = await self.proc.wait()
            log.error("the engine core %s; starting it again", _exit(code))
        delay = RESTART_DELAY_S[0]
        while not self._closing:
            try:
                if self._spawning:
                    await self._spawn()
                await self._connect()
            except (OSError, ChannelClosed, CoreFailedToStart, EngineError) as exc:
                log.error("the engine core is not back yet (next try in %gs): %s", delay, exc)
                await self._end_core()  # started but not reached: not left running
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_S[1])
                continue
            self.restarts += 1
            log.info("the engine core is back (pid %s)", self.info.get("pid"))
            return

    def _dispatch(self, msg: Message) -> None:
        kind = msg[0]
        if kind == "tok":
            st = self._streams.get(msg[1])
            if st is not None:
                st.events.put_nowait(TokenEvent(msg[2], msg[3], index=msg[4], final=msg[5]))
        elif kind in ("ev", "err"):
            st = self._streams.get(msg[1])
            if st is not None:
                st.events.put_nowait(msg[2] if kind == "ev"
                                     else ErrorEvent(msg[2].error(), msg[3]))
        elif kind == "fig":
            self._waiting, self._running, self._adds_seen = msg[1], msg[2], msg[3]
        elif kind == "ret":
            fut = self._calls.pop(msg[1], None)
            if fut is not None and not fut.done():
                if msg[2]:
                    fut.set_result(msg[3])
                else:
                    fut.set_exception(msg[3].error())
        elif kind == "cache" and self._sink is not None:
            self._sink(msg[1])

    def _send(self, msg: Message) -> None:
        self._out.append(msg)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """One frame per turn of the event loop."""
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._reads:
            out.extend(("read", rid, n) for rid, n in self._reads.items())
            self._reads.clear()
        if out and self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(out))

    # -- the facade ---------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Connected to a running core (False while it is being restarted)."""
        return self._up

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tools=tools)

    def check(self, request: GenerateRequest) -> None:
        """The engine's refusals, here: length, ids, grammar, a full queue, a core away."""
        if not self._up:
            raise EngineUnavailable("the engine is restarting; retry shortly")
        check_request(request, max_model_len=self.max_model_len, block_size=self.block_size,
                      device_pages=self.info["device_pages"], vocab_size=self.vocab_size,
                      compile_grammar=self.grammars.compile, queue_depth=self.queue_depth(),
                      max_queue=self.config.max_queue)

    async def generate(self, request: GenerateRequest
                       ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """As ``Engine.generate``: token events, then one ``FinishEvent`` per choice."""
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already generating")
        self.check(request)
        st = self._streams[rid] = _Stream()
        self._adds += 1
        self._send(("add", request))

        def on_token(ev: TokenEvent) -> None:
            st.seen(ev)
            self._reads[rid] = self._reads.get(rid, 0) + 1  # flow control, sent batched
            self._schedule_flush()

        try:
            async with contextlib.aclosing(read_events(
                    st.events, request.sampling.n, on_token, lambda: self.cancel(rid),
                    None if request.sampling.reads_text
                    else TextStream(self.tokenizer, request.sampling).text)) as it:
                async for ev in it:
                    yield ev
        finally:
            self._streams.pop(rid, None)

    def cancel(self, request_id: str) -> None:
        if self._up:
            self._send(("cancel", request_id))

    async def _call(self, name: str, *args: Any) -> Any:
        if not self._up:
            raise EngineUnavailable("the engine is restarting; retry shortly")
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._send(("call", call_id, name, args))
        try:
            return await fut
        finally:
            self._calls.pop(call_id, None)

    def _tell(self, standing: tuple[str, ...], name: str, *args: Any) -> None:
        self._standing[standing] = (name, args)
        if self._up:
            self._send(("call", None, name, args))

    async def flush(self, namespace: str) -> int:
        result: int = await self._call("flush", namespace)
        return result

    def set_quota(self, namespace: str, nbytes: int | None) -> None:
        self._tell(("quota", namespace), "set_quota", namespace, nbytes)

    def set_reservation(self, namespace: str, device_bytes: int | None,
                        host_bytes: int | None) -> None:
        self._tell(("reservation", namespace), "set_reservation", namespace, device_bytes,
                   host_bytes)

    async def pin(self, namespace: str, token_ids: list[int], key: str) -> int:
        standing = ("pin", namespace, key)
        new = standing not in self._standing
        self._standing[standing] = ("pin", (namespace, token_ids, key))
        try:
            result: int = await self._call("pin", namespace, token_ids, key)
        except BaseException:
            if new:  # its caller takes it as not pinned: a new core must not pin it
                self._standing.pop(standing, None)
            raise
        return result

    async def unpin(self, namespace: str, key: str) -> None:
        self._standing.pop(("pin", namespace, key), None)
        await self._call("unpin", namespace, key)

    async def pinned_blocks(self, namespace: str) -> int:
        result: int = await self._call("pinned_blocks", namespace)
        return result

    async def reservations(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = await self._call("reservations")
        return result

    async def stats(self) -> CacheStats:
        stats: CacheStats = await self._call("stats")
        self._stats = stats
        return stats

    async def snapshot(self) -> tuple[int, list[tuple[str, bytes, Tier]]]:
        result: tuple[int, list[tuple[str, bytes, Tier]]] = await self._call("snapshot")
        return result

    async def hottest(self, namespace: str, limit: int) -> list[HotPrefix]:
        result: list[HotPrefix] = await self._call("hottest", namespace, limit)
        return result

    async def load(self) -> dict[str, int]:
        result: dict[str, int] = await self._call("load")
        return result

    def set_event_sink(self, sink: CacheEventSink | None) -> None:
        self._sink = sink
        if self._up:
            self._send(("call", None, "events", (sink is not None,)))

    async def refresh(self) -> None:
        """Fetch the figures ``cache_stats`` and ``scheduling`` return (a scrape asks first);
        while the core restarts they stay what they were."""
        with contextlib.suppress(EngineUnavailable):
            self._stats, self._scheduling = await self._call("figures")

    def tier_bytes(self) -> dict[str, int]:
        tiers: dict[str, int] = self.info["tier_bytes"]
        return tiers

    def cache_stats(self) -> CacheStats:
        """As of the last ``refresh`` (or ``stats``)."""
        assert self._stats is not None
        return self._stats

    def scheduling(self) -> dict[str, Any]:
        return self._scheduling

    def queue_depth(self) -> int:
        """Waiting in the core as of its last frame, plus what this server sent since."""
        return self._waiting + max(0, self._adds - self._adds_seen)

    def num_running(self) -> int:
        return self._running

