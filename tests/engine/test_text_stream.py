"""Where a request's text is made from its ids (``tokenizer.TextStream``, run by
``request.read_events`` on the API server's event loop): a tenant's output must not stall
the loop every other request is served on."""

from __future__ import annotations

import asyncio
import time

from kvgate.gateway.engine import FinishEvent, SamplingParams, TokenEvent
from kvgate.gateway.engine.demo import build_tokenizer
from kvgate.gateway.engine.request import read_events
from kvgate.gateway.engine.tokenizer import TextStream
from kvgate.gateway.usage import Usage

N = 4000  # output tokens: the demo's context holds 8192
STALL_S = 0.25  # inline, the decode below takes about 0.7 s on one core


async def test_a_long_output_is_made_text_without_stalling_the_event_loop() -> None:
    """A request that does not stream gets its whole output as one event at its finish, and
    its text is made where it is read. Ids whose decode keeps ending in an incomplete
    character (a continuation byte forced with ``logit_bias``) cost the detokenizer a
    decode of all the output so far per token: seconds for one request, quadratic in its
    length (n=16 choices of 8k tokens: about a minute). The engine used to do that on its
    own thread, a token per step; the reader must not do it in one go on the event loop."""
    tok = build_tokenizer()
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    events: asyncio.Queue = asyncio.Queue()
    events.put_nowait(TokenEvent("", [0x80] * N, final=True))
    events.put_nowait(FinishEvent(Usage(1, completion_tokens=N), "length"))
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:  # another request's work on the same loop
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    got = [ev async for ev in read_events(events, 1, lambda ev: None, lambda: None,
                                          TextStream(tok, params).text)]
    done.set()
    await ticker
    assert isinstance(got[0], TokenEvent) and got[0].text == "\ufffd" * N
    assert isinstance(got[1], FinishEvent)
    assert max(gaps) < STALL_S, f"the event loop stalled {max(gaps):.2f}s"
