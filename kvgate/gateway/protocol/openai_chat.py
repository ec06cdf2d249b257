"""OpenAI chat and completion bodies: messages as the chat template takes them, the
fields every generating request shares, and usage in OpenAI's shape."""

from __future__ import annotations

from typing import Any

from kvgate.gateway.protocol.body import field
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.openai_tools import history_message, render_prompt
from kvgate.gateway.protocol.render import ChatRenderer
from kvgate.gateway.usage import Usage


def openai_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        # cache_write_tokens (the SDK's field): what the request wrote, billed as writes
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens,
                                  "cache_write_tokens": u.cache_write_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _content_text(content: Any, param: str, allow_none: bool) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad_request(f"'{param}' may only hold text parts "
                                  "({\"type\": \"text\", \"text\": ...}).", param=param,
                                  code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"'{param}' must be a string or a list of text parts.", param=param,
                      code="invalid_type")


def chat_messages(body: dict) -> list[dict]:
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise bad_request("'messages' must hold at least one message.", param="messages",
                          code="empty_messages")
    out = []
    call_ids: set[str] = set()  # tool calls so far: a tool message must answer one
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{param}' must be an object.", param=param, code="invalid_type")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"'{param}.role' must be system, developer, user, assistant "
                              f"or tool (got {role!r}).",
                              param=f"{param}.role", code="invalid_value")
        if m.get("function_call"):
            raise bad_request("The legacy 'function_call' is not supported; send "
                              "'tool_calls'.", param=param, code="unsupported_parameter")
        text = _content_text(m.get("content"), f"{param}.content",
                             allow_none=role == "assistant")
        if role == "tool" or (role == "assistant" and m.get("tool_calls")):
            out.append(history_message(m, role, param, call_ids, text))
        else:
            out.append({"role": role, "content": text})
    return out


def chat_prompt(renderer: ChatRenderer, body: dict,
                tools: list[dict[str, Any]] | None) -> list[int]:
    """A chat request's prompt: its messages and ``tools`` (checked) through the template."""
    return render_prompt(renderer, chat_messages(body), tools)


def common_fields(body: dict) -> tuple[str, bool, bool]:
    """``model``, ``stream`` and whether the stream ends with a usage chunk (chat and
    completions alike)."""
    model = field(body, "model", str, required=True)
    stream = field(body, "stream", bool, default=False)
    options = field(body, "stream_options", dict, default={})
    include_usage = bool(stream and options.get("include_usage"))
    return model, stream, include_usage
