"""An Anthropic request's prompt: tools, system and messages through the model's template.

Content blocks become the messages chat templates know (the transformers convention):
text joins into one message per turn, an assistant's ``tool_use`` blocks become its
``tool_calls`` (arguments as an object), each ``tool_result`` a ``tool`` message; the tools
go to the template as OpenAI function tools.

Cache breakpoints. A ``cache_control`` on a block marks every prompt token up to and
including that block with the breakpoint's TTL class; the token offset is found by
rendering the conversation cut after that block and taking its common prefix with the
full rendering (chat templates close a turn after its content, which the full prompt does
not have at that point). A breakpoint on a tool cuts the tool list after it instead, with a
stand-in tool in place of the rest, so the rendering parts from the full one right after
that tool whatever the template writes around the list. Anthropic caches tools, then
system, then messages; so does this prefix, in the order the template writes them.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kvgate.gateway.protocol.body import field as body_field
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.render import ChatRenderer

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
MAX_BREAKPOINTS = 4
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_CUT_TOOL = {"type": "function", "function": {"name": "~", "description": "",
                                              "parameters": {"type": "object"}}}
_TOOL_KEYS = {"name", "description", "input_schema", "cache_control", "type", "strict"}


def ttl_of(cc: Any, param: str) -> float | None:
    if cc is None:
        return None
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise bad_request(f"'{param}' must be an object with type 'ephemeral' and an "
                          "optional ttl of '5m' or '1h'.")
    ttl = cc.get("ttl", "5m")
    if not isinstance(ttl, str) or ttl not in TTL_SECONDS:
        raise bad_request(f"'{param}.ttl' must be \"5m\" or \"1h\", got {ttl!r}.")
    return TTL_SECONDS[ttl]


@dataclass
class Block:
    kind: Literal["text", "tool_use", "tool_result"]
    text: str = ""  # a text block's text, or a tool result's content
    ttl_s: float | None = None
    id: str = ""  # tool_use: its id; tool_result: the tool_use_id it answers
    name: str = ""  # tool_use: the tool's name
    input: dict[str, Any] = field(default_factory=dict)  # tool_use: the arguments


@dataclass
class Tool:
    function: dict[str, Any]  # the OpenAI function-tool shape templates take
    ttl_s: float | None = None

    @property
    def name(self) -> str:
        return str(self.function["function"]["name"])


@dataclass
class Conversation:
    """Turns in template order (a system turn first, if any), and the tools."""

    roles: list[str]
    blocks: list[list[Block]]
    tools: list[Tool] = field(default_factory=list)

    def template_messages(self, upto: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """The chat template's messages, cut after block ``upto = (turn, block)``."""
        out: list[dict[str, Any]] = []
        names: dict[str, str] = {}  # tool_use id -> tool name (tool results name it too)
        for i, (role, blocks) in enumerate(zip(self.roles, self.blocks, strict=True)):
            if upto is not None and i > upto[0]:
                break
            kept = blocks if upto is None or i < upto[0] else blocks[: upto[1] + 1]
            if role == "assistant":
                out.append(_assistant(kept, names))
                continue
            text: list[str] = []
            for b in kept:
                if b.kind == "tool_result":
                    if text:
                        out.append({"role": role, "content": "".join(text)})
                        text = []
                    out.append({"role": "tool", "tool_call_id": b.id,
                                "name": names.get(b.id, ""), "content": b.text})
                else:
                    text.append(b.text)
            if text or not kept:
                out.append({"role": role, "content": "".join(text)})
        return out

    def tool_specs(self, upto: int | None = None) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        if upto is None:
            return [t.function for t in self.tools]
        return [t.function for t in self.tools[: upto + 1]] + [_CUT_TOOL]

    def render(self, renderer: ChatRenderer) -> list[int]:
        return list(renderer.render_chat(self.template_messages(), tools=self.tool_specs()))


def _assistant(blocks: list[Block], names: dict[str, str]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant",
                           "content": "".join(b.text for b in blocks if b.kind == "text")}
    calls = []
    for b in blocks:
        if b.kind == "tool_use":
            names[b.id] = b.name
            calls.append({"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": b.input}})
    if calls:
        msg["tool_calls"] = calls
    return msg


# -- parsing ---------------------------------------------------------------------------------


def parse_conversation(body: dict) -> Conversation:
    """System, messages and tools of a Messages request; validates shape, roles and that
    every ``tool_use`` is answered by a ``tool_result`` in the next turn (and only then)."""
    roles: list[str] = []
    blocks: list[list[Block]] = []
    system = body.get("system")
    if system is not None and system != "" and system != []:
        roles.append("system")
        blocks.append(_blocks(system, "system", "system"))
    messages = body_field(body, "messages", list, required=True)
    if not messages:
        raise bad_request("'messages' must hold at least one message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"'messages[{i}]' must be an object with role 'user' or "
                              "'assistant'.")
        roles.append(m["role"])
        blocks.append(_blocks(m.get("content"), f"messages[{i}].content", m["role"]))
    _check_tool_pairs(blocks[len(blocks) - len(messages):])
    return Conversation(roles, blocks, parse_tools(body))


def _blocks(content: Any, param: str, role: str) -> list[Block]:
    if isinstance(content, str):
        return [Block("text", content)]
    if not isinstance(content, list) or not content:
        raise bad_request(f"'{param}' must be a string or a non-empty list of content "
                          "blocks.")
    return [_block(b, f"{param}[{j}]", role) for j, b in enumerate(content)]


def _block(block: Any, p: str, role: str) -> Block:
    kind = block.get("type") if isinstance(block, dict) else None
    allowed = {"system": ("text",), "user": ("text", "tool_result"),
               "assistant": ("text", "tool_use")}[role]
    if kind not in allowed:
        raise bad_request(f"'{p}' must be a block of type {' or '.join(allowed)} in a "
                          f"{role} turn (got {kind!r}); images, documents and thinking "
                          "blocks are not supported.")
    assert isinstance(block, dict)
    ttl = ttl_of(block.get("cache_control"), f"{p}.cache_control")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise bad_request(f"'{p}.text' must be a string.")
        return Block("text", block["text"], ttl)
    if kind == "tool_use":
        if not isinstance(block.get("id"), str) or not block["id"]:
            raise bad_request(f"'{p}.id' must be a non-empty string.")
        if not isinstance(block.get("name"), str) or not TOOL_NAME.match(block["name"]):
            raise bad_request(f"'{p}.name' must be a tool name (letters, digits, _ and -).")
        if not isinstance(block.get("input"), dict):
            raise bad_request(f"'{p}.input' must be an object.")
        return Block("tool_use", "", ttl, block["id"], block["name"], block["input"])
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        raise bad_request(f"'{p}.tool_use_id' must be a non-empty string.")
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise bad_request(f"'{p}.is_error' must be a boolean.")
    text = _result_text(block.get("content", ""), f"{p}.content")
    # A failed call is told to the model as such: the template has no field for it.
    return Block("tool_result", f"Error: {text}" if is_error else text, ttl,
                 block["tool_use_id"])


def _result_text(content: Any, p: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, b in enumerate(content):
            if not isinstance(b, dict) or b.get("type") != "text" \
                    or not isinstance(b.get("text"), str):
                raise bad_request(f"'{p}[{j}]' must be a text block; images and documents "
                                  "in tool results are not supported.")
            parts.append(b["text"])
        return "".join(parts)
    raise bad_request(f"'{p}' must be a string or a list of text blocks.")


def _check_tool_pairs(blocks: list[list[Block]]) -> None:
    seen: set[str] = set()
    for i, bl in enumerate(blocks):
        uses = [b.id for b in bl if b.kind == "tool_use"]
        for uid in uses:
            if uid in seen:
                raise bad_request(f"'messages[{i}]': tool_use id '{uid}' is used twice.")
            seen.add(uid)
        results = [b.id for b in bl if b.kind == "tool_result"]
        asked = {b.id for b in blocks[i - 1] if b.kind == "tool_use"} if i else set()
        stray = [r for r in results if r not in asked]
        if stray:
            raise bad_request(f"'messages[{i}]': tool_result for '{stray[0]}' has no "
                              "matching tool_use block in the previous message.")
        if uses:
            answered = {b.id for b in blocks[i + 1] if b.kind == "tool_result"} \
                if i + 1 < len(blocks) else set()
            missing = [u for u in uses if u not in answered]
            if missing:
                raise bad_request(f"'messages[{i}]': tool_use ids were found without "
                                  f"tool_result blocks immediately after: {missing[0]}. "
                                  "Each tool_use block must have a corresponding "
                                  "tool_result block in the next message.")


def parse_tools(body: dict) -> list[Tool]:
    tools = body_field(body, "tools", list, default=[])
    out: list[Tool] = []
    names: set[str] = set()
    for k, t in enumerate(tools):
        p = f"tools[{k}]"
        if not isinstance(t, dict):
            raise bad_request(f"'{p}' must be an object.")
        if t.get("type", "custom") != "custom":
            raise bad_request(f"'{p}.type' {t.get('type')!r}: server tools are not supported; "
                              "define a custom tool (name, description, input_schema).")
        extra = sorted(set(t) - _TOOL_KEYS)
        if extra:
            raise bad_request(f"'{p}.{extra[0]}' is not supported.")
        if t.get("strict") not in (None, False):
            raise bad_request(f"'{p}.strict' is not supported; use tool_choice 'any' or "
                              "'tool' to have the arguments follow the schema.")
        name = t.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise bad_request(f"'{p}.name' must be 1 to 128 letters, digits, _ or -.")
        if name in names:
            raise bad_request(f"'{p}.name': tool names must be unique ('{name}' repeats).")
        names.add(name)
        description = t.get("description", "")
        if not isinstance(description, str):
            raise bad_request(f"'{p}.description' must be a string.")
        schema = t.get("input_schema")
        check_schema(schema, f"{p}.input_schema")
        fn: dict[str, Any] = {"name": name, "parameters": schema}
        if description:
            fn["description"] = description
        out.append(Tool({"type": "function", "function": fn},
                        ttl_of(t.get("cache_control"), f"{p}.cache_control")))
    return out


def check_schema(schema: Any, p: str) -> None:
    """What a tool's input schema must be: a JSON schema for an object."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise bad_request(f"'{p}' must be a JSON schema object with \"type\": \"object\".")
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, (dict, bool))
                                               for v in props.values()):
        raise bad_request(f"'{p}.properties' must map names to JSON schemas.")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad_request(f"'{p}.required' must be a list of property names.")
    try:
        json.dumps(schema)
    except (TypeError, ValueError):
        raise bad_request(f"'{p}' is not JSON.") from None


# -- breakpoints -----------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def ttl_segments(renderer: ChatRenderer, conv: Conversation, prompt: list[int],
                 top_level: float | None) -> list[tuple[int, float]]:
    """(end token, TTL seconds) of each breakpoint, in prompt order."""
    tool_points = [(k, t.ttl_s) for k, t in enumerate(conv.tools) if t.ttl_s is not None]
    block_points = [((i, j), b.ttl_s) for i, bl in enumerate(conv.blocks)
                    for j, b in enumerate(bl) if b.ttl_s is not None]
    count = len(tool_points) + len(block_points) + (top_level is not None)
    if count > MAX_BREAKPOINTS:
        raise bad_request(f"At most {MAX_BREAKPOINTS} cache_control breakpoints are allowed "
                          f"(tools, system, messages and top level together); got {count}.")
    segments = []
    for k, ttl in tool_points:
        cut = renderer.render_chat(conv.template_messages(), tools=conv.tool_specs(upto=k))
        segments.append((common_prefix(list(cut), prompt), ttl))
    for upto, ttl in block_points:
        cut = renderer.render_chat(conv.template_messages(upto), tools=conv.tool_specs())
        segments.append((common_prefix(list(cut), prompt), ttl))
    if top_level is not None:
        segments.append((len(prompt), top_level))
    ordered = sorted(((end, float(ttl)) for end, ttl in segments if ttl is not None),
                     key=lambda seg: (seg[0], -seg[1]))
    for (_, before), (_, after) in itertools.pairwise(ordered):
        if after > before:  # Anthropic's rule: longer TTLs come first in the prompt
            raise bad_request(f"A cache_control breakpoint with ttl '{_ttl_name(after)}' must not "
                              f"come after one with ttl '{_ttl_name(before)}': longer TTLs "
                              "come first (tools, then system, then messages).")
    return ordered


def _ttl_name(ttl_s: float) -> str:
    return next((name for name, s in TTL_SECONDS.items() if s == ttl_s), f"{int(ttl_s)}s")
