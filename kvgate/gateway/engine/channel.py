"""The channel between the engine core process and its API servers.

A Unix socket in a directory only the server's user can enter, and on it frames: a 4-byte
length, then a pickle (protocol 5) of a list of messages, each a tuple whose first item
names it. Both sides batch: the core sends one frame per engine step (every request's
events of that step, and the step's figures), an API server one frame per turn of its
event loop. The peer is proven before anything is unpickled: the core sends a random
challenge, the API server answers with its HMAC under the key the supervisor gave both
(the socket's directory is the first guard, the key the second).

Messages, API server → core:
  ``("add", GenerateRequest)``, ``("cancel", request_id)``,
  ``("read", request_id, n)``: the client read ``n`` more token events (flow control),
  ``("call", call_id, name, args)``: one of ``CALLS``; ``call_id`` None: no reply wanted.
Core → API server:
  ``("hello", info)`` once, ``("tok", request_id, text, token_ids, index)`` (a token
  event with neither usage nor logprobs: most of them), ``("ev", request_id, event)``
  (any other token event, a finish event),
  ``("err", request_id, WireError, usage)``, ``("ret", call_id, ok, value)``,
  ``("cache", CacheEvent)`` (once asked for), ``("fig", waiting, running, adds_seen)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import pickle
import secrets
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30
CHALLENGE_BYTES = 32

# What an API server may ask the core to run (``Engine`` methods); nothing else is called.
CALLS = frozenset({"flush", "set_quota", "set_reservation", "pin", "unpin", "pinned_blocks",
                   "reservations", "stats", "snapshot", "hottest", "load", "figures",
                   "events"})

Message = tuple[Any, ...]


class ChannelClosed(ConnectionError):
    """The other side went away (or sent what is not a frame)."""


def frame(messages: list[Message]) -> bytes:
    data = pickle.dumps(messages, protocol=5)
    return HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> list[Message]:
    try:
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if size > MAX_FRAME:
            raise ChannelClosed(f"a frame of {size} bytes")
        messages: list[Message] = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        raise ChannelClosed(str(exc) or "closed") from exc
    return messages


def _mac(key: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, challenge, hashlib.sha256).digest()


async def challenge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    key: bytes) -> bool:
    """The core's side: True when the peer knows ``key``."""
    nonce = secrets.token_bytes(CHALLENGE_BYTES)
    writer.write(nonce)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.readexactly(32), 10)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return False
    return hmac.compare_digest(answer, _mac(key, nonce))


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: bytes) -> None:
    """The API server's side of ``challenge``."""
    try:
        nonce = await reader.readexactly(CHALLENGE_BYTES)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed("the core closed the connection") from exc
    writer.write(_mac(key, nonce))
    await writer.drain()
