"""Server-sent events as the gateway writes them, read from aiohttp or requests responses.

One parser for both: lines are split on ``\\n`` (a trailing ``\\r`` dropped), an event
ends at a blank line, ``data:`` lines of one event are joined with ``\\n``, comments
(``:``) are skipped, and an event cut off by the end of the stream is not reported.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import requests

DONE = "[DONE]"


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str | None = None  # the ``event:`` line; the Anthropic API names every event

    @property
    def done(self) -> bool:
        """OpenAI's end-of-stream marker."""
        return self.data == DONE

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def payload(self) -> Any:
        """The decoded JSON, or ``"[DONE]"`` as it is."""
        return self.data if self.done else self.json()


class _Parser:
    def __init__(self) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> Iterator[SseEvent]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            event = self._line(raw.decode().removesuffix("\r"))
            if event is not None:
                yield event

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            event = SseEvent("\n".join(self._data), self._event) if self._data else None
            self._event, self._data = None, []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


async def aiter_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """Events of an aiohttp response, as they arrive."""
    parser = _Parser()
    async for chunk in resp.content.iter_any():
        for event in parser.feed(chunk):
            yield event


def iter_sse(resp: requests.Response) -> Iterator[SseEvent]:
    """Events of a ``requests`` response (send it with ``stream=True``), as they arrive."""
    return _parse(resp.iter_content(chunk_size=None))


def _parse(chunks: Iterable[bytes]) -> Iterator[SseEvent]:
    parser = _Parser()
    for chunk in chunks:
        yield from parser.feed(chunk)
