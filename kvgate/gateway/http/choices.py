"""The choices of one HTTP request: ``n`` samples of each of its prompts, and one bill.

A completions request may carry several prompts, each generated as its own engine request
with ``n`` choices; choice ``prompt_index * n + j`` is sample ``j`` of prompt
``prompt_index``. ``Choices`` collects their text, tokens, log probabilities and finishes,
and adds up the one usage the request is billed with: each prompt counted once (from its
first choice, which carries the prompt's cache split), the completions of all choices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from kvgate.gateway.engine import FinishEvent, TokenEvent
from kvgate.gateway.engine.sampling import TokenLogprob
from kvgate.gateway.usage import CacheDetail, Usage


@dataclass
class Choice:
    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Choices:
    def __init__(self, n: int, num_prompts: int = 1) -> None:
        self.n = n
        self.items = [Choice(i) for i in range(n * num_prompts)]
        self._finishes: dict[int, FinishEvent] = {}

    def add(self, ev: TokenEvent) -> None:
        c = self.items[ev.index]
        c.token_ids += ev.token_ids
        if ev.text:
            c.text_parts.append(ev.text)
        if ev.logprobs:
            c.logprobs += ev.logprobs

    def finish(self, ev: FinishEvent) -> bool:
        """Record one choice's finish; True once every choice has finished."""
        c = self.items[ev.index]
        c.finish_reason, c.stop_sequence = ev.finish_reason, ev.stop_sequence
        self._finishes[ev.index] = ev
        return len(self._finishes) == len(self.items)

    @property
    def done(self) -> bool:
        return len(self._finishes) == len(self.items)

    def usage(self) -> Usage:
        """Prompts once each (their first choice's split), completions of every choice."""
        prompt = cached = completion = 0
        writes: dict[int, int] = {}
        for index, ev in self._finishes.items():
            completion += ev.usage.completion_tokens
            if index % self.n == 0:
                prompt += ev.usage.prompt_tokens
                cached += ev.usage.cached_tokens
                for ttl, tokens in ev.usage.cache_writes.items():
                    writes[ttl] = writes.get(ttl, 0) + tokens
        return Usage(prompt, cached, writes, completion)

    def cache(self) -> CacheDetail:
        """The blocks behind ``usage``'s prompt split: each prompt's first choice's."""
        detail = CacheDetail()
        for index in sorted(self._finishes):
            if index % self.n == 0:
                detail += self._finishes[index].cache
        return detail


async def merged(streams: list[AsyncGenerator[TokenEvent | FinishEvent, None]], n: int
                 ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
    """The events of one engine request per prompt as one stream, each event's ``index``
    made the request-wide choice index; the first error ends it (closing the others)."""
    queue: asyncio.Queue[tuple[int, TokenEvent | FinishEvent | BaseException | None]] = \
        asyncio.Queue()

    async def pump(k: int, stream: AsyncGenerator[TokenEvent | FinishEvent, None]) -> None:
        try:
            async for ev in stream:
                await queue.put((k, ev))
        except Exception as exc:
            await queue.put((k, exc))
        else:
            await queue.put((k, None))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    open_streams = len(tasks)
    try:
        while open_streams:
            k, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                item.index += k * n
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
