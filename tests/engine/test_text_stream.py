"""Where a request's text is made from its ids (``tokenizer.TextStream``, run by
``request.read_events`` on the API server): a tenant's output must not stall the event
loop every other request is served on."""

from __future__ import annotations

import asyncio
import threading

from kvgate.gateway.engine import FinishEvent, SamplingParams, TokenEvent
from kvgate.gateway.engine.demo import build_tokenizer
from kvgate.gateway.engine.request import INLINE_TEXT_IDS, read_events
from kvgate.gateway.engine.tokenizer import TextStream
from kvgate.gateway.usage import Usage

N = 4000  # output tokens: the demo's context holds 8192


async def test_a_long_output_is_made_text_off_the_event_loop() -> None:
    """A request that does not stream gets its whole output as one event at its finish,
    and its text is made where it is read: thousands of ids (here continuation bytes, as
    ``logit_bias`` can force) are decoded on a worker thread, not on the loop; an event of
    a few ids (a streamed token) is decoded inline, where a thread hop would cost more.
    Each event is counted (``on_token``) before its text is made."""
    tok = build_tokenizer()
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    stream = TextStream(tok, params)
    threads: list[tuple[int, int]] = []  # (ids, the thread that made their text)
    counted: list[int] = []

    def text(ev: TokenEvent) -> str:
        assert len(counted) == len(threads) + 1, "counted before its text is made"
        threads.append((len(ev.token_ids), threading.get_ident()))
        return stream.text(ev)

    events: asyncio.Queue = asyncio.Queue()
    events.put_nowait(TokenEvent("", [ord("a")] * (INLINE_TEXT_IDS // 2)))
    events.put_nowait(TokenEvent("", [0x80] * N, final=True))
    events.put_nowait(FinishEvent(Usage(1, completion_tokens=N), "length"))
    got = [ev async for ev in read_events(events, 1, lambda ev: counted.append(1),
                                          lambda: None, text)]
    loop_thread = threading.get_ident()
    assert [n for n, _ in threads] == [INLINE_TEXT_IDS // 2, N]
    assert threads[0][1] == loop_thread and threads[1][1] != loop_thread
    assert isinstance(got[0], TokenEvent) and got[0].text == "a" * (INLINE_TEXT_IDS // 2)
    assert isinstance(got[1], TokenEvent) and got[1].text == "\ufffd" * N
    assert isinstance(got[2], FinishEvent)
