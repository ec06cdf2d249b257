"""Pure logic of the HTTP layer: admission limits and cache_control → TTL segments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvgate.gateway.http.limits import Limiter
from kvgate.gateway.protocol.anthropic import parse_conversation, ttl_segments
from kvgate.gateway.protocol.errors import ApiError


def principal(tid: int = 1, rpm: int | None = None, tpm: int | None = None,
              conc: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(tenant_id=tid, requests_per_minute=rpm, tokens_per_minute=tpm,
                           max_concurrent=conc)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_window_slides() -> None:
    clock = Clock()
    lim = Limiter(100, clock)
    p = principal(rpm=2)
    lim.admit(p, 1).release()
    clock.now += 30
    lim.admit(p, 1).release()
    with pytest.raises(ApiError) as e:
        lim.admit(p, 1)
    assert e.value.status == 429 and e.value.retry_after == pytest.approx(30)
    clock.now += 30.5  # the first request left the window
    lim.admit(p, 1).release()


def test_tokens_window_counts_completion_too() -> None:
    clock = Clock()
    lim = Limiter(100, clock)
    p = principal(tpm=100)
    t = lim.enter(p)
    assert t.charge(40, 50) == 50
    t.settle(50)
    t.release()
    with pytest.raises(ApiError) as e:
        lim.admit(p, 20)
    assert e.value.status == 429
    lim.admit(p, 10).release()  # 90 + 10 fits
    with pytest.raises(ApiError) as e:
        lim.admit(principal(tid=2, tpm=10), 11)
    assert "exceeds" in e.value.message


def test_concurrency_and_global_bound() -> None:
    lim = Limiter(2, Clock())
    a = lim.admit(principal(conc=1), 1)
    with pytest.raises(ApiError) as e:
        lim.admit(principal(conc=1), 1)
    assert e.value.status == 429
    b = lim.admit(principal(tid=2), 1)
    with pytest.raises(ApiError) as e:
        lim.admit(principal(tid=3), 1)
    assert e.value.status == 503 and e.value.retry_after
    a.release()
    a.release()  # idempotent
    assert lim.inflight == 1
    b.release()
    assert lim.inflight == 0 and lim.pending == 0


def test_the_worst_case_is_debited_and_the_unused_part_refunded() -> None:
    """Concurrent requests cannot overshoot: each holds its prompt and its most output
    until it is billed, then gives back what it did not produce."""
    clock = Clock()
    lim = Limiter(100, clock)
    p = principal(tpm=500)
    held = []
    for _ in range(12):  # 12 at once, 10 prompt + 100 output each: 4 fit, 8 are refused
        t = lim.enter(p)
        try:
            t.charge(10, 100)
        except ApiError as e:
            assert e.status == 429 and e.retry_after is not None
            t.release()
            continue
        held.append(t)
    assert len(held) == 4
    for t in held:  # each made 5 tokens: 95 each back
        t.settle(5)
        t.release()
    assert lim._state(1).tokens.total == 4 * 15
    t = lim.enter(p)
    assert t.charge(10, 100) == 100  # fits again at once, no wait
    t.release()  # released unbilled: its output debit comes back, its prompt stays
    assert lim._state(1).tokens.total == 4 * 15 + 10
    clock.now += 61
    t = lim.enter(p)
    t.charge(10, 100)
    clock.now += 61  # billed after its entry left the window: nothing to refund
    t.settle(3)
    assert lim._state(1).tokens.total == 0


def test_a_request_that_can_never_fit_is_a_400_naming_its_bound() -> None:
    lim = Limiter(100, Clock())
    t = lim.enter(principal(tpm=100))
    with pytest.raises(ApiError) as e:
        t.charge(10, 50, outputs=2, param="max_completion_tokens")  # 110 > 100
    assert e.value.status == 400 and e.value.param == "max_completion_tokens"
    assert e.value.retry_after is None


def test_a_default_bound_is_cut_to_what_the_minute_has_left() -> None:
    """A request that named no max_tokens gets the window's rest (at least one token per
    output) instead of a 429; below that it waits like any other."""
    lim = Limiter(100, Clock())
    p = principal(tpm=100)
    first = lim.enter(p)
    assert first.charge(20, 76, flexible=True) == 76  # fits as asked
    t = lim.enter(p)
    with pytest.raises(ApiError) as e:  # 4 left: nothing for even one token after its prompt
        t.charge(4, 256, flexible=True)
    assert e.value.status == 429
    t.release()
    first.settle(26)  # 50 back
    t = lim.enter(p)
    assert t.charge(10, 256, outputs=4, flexible=True) == 11  # 100 - 46 - 10 = 44 for 4
    with pytest.raises(ApiError) as e:  # its prompt alone can never fit: a 400
        lim.enter(principal(tid=2, tpm=100)).charge(101, 1, flexible=True)
    assert e.value.status == 400


def test_capacity_counts_the_engine_not_open_handlers() -> None:
    """Requests handed to the engine count as the engine counts them (a stalled stream
    the engine parked counts nothing); open handlers have a ceiling of their own."""
    lim = Limiter(2, Clock(), max_open=4)
    engine_load = [0]
    lim.occupancy = lambda: engine_load[0]
    tickets = [lim.enter(principal(tid=i)) for i in range(2)]
    with pytest.raises(ApiError) as e:  # two not yet submitted: full
        lim.enter(principal(tid=9))
    assert e.value.status == 503 and e.value.reason == "capacity"  # type: ignore[attr-defined]
    for t in tickets:
        t.submitted()  # the engine has them; then they stall and it parks them
    tickets += [lim.enter(principal(tid=i)) for i in (2, 3)]
    engine_load[0] = 1
    with pytest.raises(ApiError):
        lim.enter(principal(tid=9))  # 2 pending + 1 in the engine
    for t in tickets[2:]:
        t.submitted()
    engine_load[0] = 0
    with pytest.raises(ApiError) as e:  # 4 handlers open: the ceiling
        lim.enter(principal(tid=9))
    assert e.value.reason == "open_requests"  # type: ignore[attr-defined]
    tickets[0].release()
    lim.enter(principal(tid=9)).release()
    assert lim.pending == 0


class Template:
    """A chat template that, like real ones, closes each turn after its content."""

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        listed = "".join(f"<{t['function']['name']}>" for t in tools or [])
        text = listed + "".join(f"[{m['role']}]{m['content']}[/]" for m in messages)
        return list((text + "@assistant").encode())


def test_breakpoints_map_to_token_offsets() -> None:
    body = {"system": [{"type": "text", "text": "SYS", "cache_control": {"type": "ephemeral",
                                                                         "ttl": "1h"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "AA", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "BB"}]}]}
    conv = parse_conversation(body)
    engine = Template()
    prompt = engine.render_chat([{"role": "system", "content": "SYS"},
                                 {"role": "user", "content": "AABB"}])
    segs = ttl_segments(engine, conv, prompt, None)  # type: ignore[arg-type]
    # "[system]SYS[/]" is 14 bytes; "[user]AA" ends at 22 (its closing "[/]" is not in the
    # full prompt there, so it does not count).
    assert segs == [(14, 3600.0), (22, 300.0)]
    assert ttl_segments(engine, conv, prompt, 300.0)[-1] == (len(prompt), 300.0)  # type: ignore[arg-type]


def test_tool_breakpoint_covers_the_tools_before_it() -> None:
    schema = {"type": "object"}
    body = {"tools": [{"name": "a", "input_schema": schema},
                      {"name": "bb", "input_schema": schema,
                       "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "Q"}]}
    conv = parse_conversation(body)
    engine = Template()
    prompt = conv.render(engine)  # type: ignore[arg-type]
    # "<a><bb>" is 7 bytes: the last tool's breakpoint ends there, not at the prompt's end.
    assert ttl_segments(engine, conv, prompt, None) == [(7, 300.0)]  # type: ignore[arg-type]


def test_too_many_breakpoints() -> None:
    cc = {"type": "ephemeral"}
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": str(i), "cache_control": cc} for i in range(5)]}]}
    conv = parse_conversation(body)
    with pytest.raises(ApiError):
        ttl_segments(Template(), conv, [1, 2, 3], None)  # type: ignore[arg-type]
