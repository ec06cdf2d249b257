"""The response-shape check can fail: the SDK models alone (no OpenAPI document) reject a
missing required field, a wrong JSON type, a wrong literal and an unknown field, and
accept what the server sends (samples below, as the server wrote them)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testkit import shapes

CHAT = {
    "id": "chatcmpl-7f0993fb24da4ccaa1a13d21b99b029c", "object": "chat.completion",
    "created": 1796112854, "model": "demo",
    "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                 "message": {"role": "assistant", "content": "abc", "refusal": None}}],
    "usage": {"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0}},
}
CHAT_CHUNK = {
    "id": "chatcmpl-7a0b448e2d914bc2a166f6df7d8b6f33", "object": "chat.completion.chunk",
    "created": 1796112854, "model": "demo", "usage": None,
    "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
}
COMPLETION_CHUNK = {
    "id": "cmpl-97960643a6a641f1ad8a27660b67e5ba", "object": "text_completion",
    "created": 1796112854, "model": "demo", "usage": None,
    "choices": [{"index": 0, "text": "Iw", "logprobs": None, "finish_reason": None}],
}
MESSAGE = {
    "id": "msg_26ee34684655402d8eef22d1151df772", "type": "message", "role": "assistant",
    "model": "demo", "content": [{"type": "text", "text": "xyz"}],
    "stop_reason": "max_tokens", "stop_sequence": None,
    "usage": {"input_tokens": 15, "output_tokens": 3, "cache_read_input_tokens": 0,
              "cache_creation_input_tokens": 0, "service_tier": "standard",
              "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                 "ephemeral_1h_input_tokens": 0}},
}
MESSAGE_DELTA = {
    "type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
    "usage": {"input_tokens": 15, "output_tokens": 3, "cache_read_input_tokens": 0,
              "cache_creation_input_tokens": 0},
}
MODELS = {"object": "list", "data": [{"id": "demo", "object": "model", "created": 1796112473,
                                      "owned_by": "kvgate", "note": "random weights"}]}

Check = Callable[[str, Any], None]
GOOD: list[tuple[Check, str, dict[str, Any]]] = [
    (shapes.check_openai, "ChatCompletion", CHAT),
    (shapes.check_openai, "ChatCompletionChunk", CHAT_CHUNK),
    (shapes.check_openai, "CompletionChunk", COMPLETION_CHUNK),
    (shapes.check_openai, "ModelList", MODELS),
    (shapes.check_anthropic, "Message", MESSAGE),
    (shapes.check_anthropic, "RawMessageStreamEvent", MESSAGE_DELTA),
]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change at a dotted path (list indices as numbers); ``...`` deletes the field."""
    *parents, last = path.split(".")

    def change(body: dict[str, Any]) -> None:
        node: Any = body
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return change


BROKEN: list[tuple[str, Check, str, dict[str, Any], Callable[[dict[str, Any]], None]]] = [
    ("chat-missing-model", shapes.check_openai, "ChatCompletion", CHAT, _set("model", ...)),
    ("chat-missing-usage-count", shapes.check_openai, "ChatCompletion", CHAT,
     _set("usage.completion_tokens", ...)),
    ("chat-created-as-string", shapes.check_openai, "ChatCompletion", CHAT,
     _set("created", "1796112854")),
    ("chat-tokens-as-float", shapes.check_openai, "ChatCompletion", CHAT,
     _set("usage.prompt_tokens", 15.0)),
    ("chat-wrong-object", shapes.check_openai, "ChatCompletion", CHAT,
     _set("object", "chat.completions")),
    ("chat-wrong-finish-reason", shapes.check_openai, "ChatCompletion", CHAT,
     _set("choices.0.finish_reason", "max_tokens")),
    ("chat-misspelled-optional", shapes.check_openai, "ChatCompletion", CHAT,
     _set("usage.prompt_token_details", {"cached_tokens": 0})),
    ("chunk-object-of-final", shapes.check_openai, "ChatCompletionChunk", CHAT_CHUNK,
     _set("object", "chat.completion")),
    ("completion-chunk-text-null", shapes.check_openai, "CompletionChunk", COMPLETION_CHUNK,
     _set("choices.0.text", None)),
    ("models-id-as-number", shapes.check_openai, "ModelList", MODELS, _set("data.0.id", 7)),
    ("message-missing-usage", shapes.check_anthropic, "Message", MESSAGE, _set("usage", ...)),
    ("message-user-role", shapes.check_anthropic, "Message", MESSAGE, _set("role", "user")),
    ("message-content-string", shapes.check_anthropic, "Message", MESSAGE,
     _set("content", "xyz")),
    ("message-cache-read-bool", shapes.check_anthropic, "Message", MESSAGE,
     _set("usage.cache_read_input_tokens", True)),
    ("event-unknown-type", shapes.check_anthropic, "RawMessageStreamEvent", MESSAGE_DELTA,
     _set("type", "message_end")),
    ("event-delta-output-string", shapes.check_anthropic, "RawMessageStreamEvent",
     MESSAGE_DELTA, _set("usage.output_tokens", "3")),
]


@pytest.mark.parametrize(("check", "name", "body"), GOOD, ids=[g[1] for g in GOOD])
def test_server_shapes_pass(check: Check, name: str, body: dict[str, Any]) -> None:
    check(name, copy.deepcopy(body))


@pytest.mark.parametrize(("case", "check", "name", "body", "change"), BROKEN,
                         ids=[b[0] for b in BROKEN])
def test_broken_shape_fails_without_the_document(
        monkeypatch: pytest.MonkeyPatch, case: str, check: Check, name: str,
        body: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> None:
    monkeypatch.setattr(shapes, "SPEC_PATH", Path("no-such-openapi-document.yaml"))
    check(name, copy.deepcopy(body))  # the unbroken sample passes on the SDK models alone
    broken = copy.deepcopy(body)
    change(broken)
    with pytest.raises(AssertionError, match=name):
        check(name, broken)
