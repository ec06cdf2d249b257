"""Request bodies for the three generating APIs, built one way for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
         "messages": "/v1/messages"}
KINDS = tuple(PATHS)


class ApiRequest(NamedTuple):
    path: str
    body: dict[str, Any]


def request_body(kind: str, text: str, max_tokens: int, *, system: str | None = None,
                 history: Sequence[tuple[str, str]] = (), model: str = "demo",
                 **extra: Any) -> ApiRequest:
    """``kind``: chat | completions | messages, with ``-stream`` for the SSE variant (whose
    OpenAI bodies ask for the usage chunk). ``text`` is the last user turn, ``history`` the
    (user, assistant) turns before it, ``system`` the system prompt. Completions have no
    roles: with a system prompt or history the prompt is the system text followed by a
    ``Q:``/``A:`` transcript ending in ``A:``. ``extra`` fields are set last, as given."""
    base, _, mode = kind.partition("-")
    if base not in PATHS or mode not in ("", "stream"):
        raise ValueError(f"unknown request kind {kind!r} (chat, completions or messages, "
                         "optionally with -stream)")
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    if base == "completions":
        if system is None and not history:
            body["prompt"] = text
        else:
            turns = [*history, (text, "")]
            body["prompt"] = (system or "") + "".join(f"\nQ: {q}\nA: {a}" for q, a in turns)
    else:
        messages: list[dict[str, Any]] = []
        for question, answer in history:
            messages.append({"role": "user", "content": question})
            if answer:
                messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": text})
        if system is not None and base == "chat":
            messages.insert(0, {"role": "system", "content": system})
        elif system is not None:
            body["system"] = system
        body["messages"] = messages
    if mode == "stream":
        body["stream"] = True
        if base != "messages":
            body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return ApiRequest(PATHS[base], body)
