"""Pure logic of the HTTP layer: admission limits and cache_control → TTL segments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvgate.gateway.http.anthropic_prompt import parse_conversation, ttl_segments
from kvgate.gateway.http.errors import ApiError
from kvgate.gateway.http.limits import Limiter


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
    t = lim.admit(p, 40)
    t.add_tokens(50)
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
    assert lim.inflight == 0


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
