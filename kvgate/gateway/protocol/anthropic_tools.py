"""Anthropic tool use: ``tool_choice``, and the model's output as content blocks.

The model writes its calls as text in its family's form (``kvgate.gateway.protocol.tool_parsers``); the
same ``ToolStream`` reads a streamed answer and a whole one, and ``Blocks`` turns what it
reads into Anthropic's content blocks and stream events: a ``text`` block for text, a
``tool_use`` block (``toolu_`` id, name, input) per call, streamed as
``content_block_start`` with an empty input, one ``input_json_delta`` holding the
arguments, and ``content_block_stop``, which is what the SDK's ``messages.stream``
assembles. So a streamed answer reassembles to exactly the non-streamed one.

``tool_choice`` ``any`` and ``tool`` force a call with a grammar (constrained decoding in
the engine): the output is one call or more (one with ``disable_parallel_tool_use``) of
any tool or of the named one, its input following the tool's schema. ``none`` keeps the
tools in the prompt (so the cached prefix stays the same) and reads no calls from the
output. ``disable_parallel_tool_use`` with ``auto`` answers with the first call only.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from kvgate.gateway.protocol.anthropic import Tool
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.tool_parsers import (
    ToolCallDelta,
    ToolParser,
    ToolStream,
    call_or_answer_grammar,
    forced_call_grammar,
)

if TYPE_CHECKING:
    from kvgate.gateway.engine.structured import StructuredSpec

Event = tuple[str, dict[str, Any]]  # (SSE event name, data)


@dataclass(frozen=True)
class ToolChoice:
    kind: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.kind in ("any", "tool")


def parse_tool_choice(body: dict, tools: list[Tool]) -> ToolChoice | None:
    """None: no tools, so nothing to choose (a plain text answer)."""
    raw = body.get("tool_choice")
    if raw is None:
        return ToolChoice("auto") if tools else None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise bad_request("'tool_choice' must be an object with type 'auto', 'any', 'tool' "
                          "or 'none'.")
    assert isinstance(raw, dict)
    disable = raw.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise bad_request("'tool_choice.disable_parallel_tool_use' must be a boolean.")
    name = None
    if kind == "tool":
        name = raw.get("name")
        known = [t.name for t in tools]
        if not isinstance(name, str) or name not in known:
            raise bad_request(f"'tool_choice.name' {name!r} is not one of the tools "
                              f"({', '.join(known) or 'none given'}).")
    if kind == "any" and not tools:
        raise bad_request("'tool_choice' 'any' needs 'tools'.")
    if not tools:
        return None
    return ToolChoice(kind, name, parallel=not disable)


def forced_grammar(choice: ToolChoice | None, tools: list[Tool], parser: ToolParser | None,
                   output: StructuredSpec | None = None) -> StructuredSpec | None:
    """What shapes the answer: a forced call (a named tool is called exactly once), calls
    or text in the ``output`` format (tool_choice auto), or the format alone."""
    if choice is None or not choice.forced:
        if output is not None and choice is not None and choice.kind == "auto" \
                and parser is not None and tools:
            return call_or_answer_grammar([t.function for t in tools], parser,
                                          choice.parallel, output)
        return output
    if parser is None:
        raise bad_request("'tool_choice' cannot force a call: this server reads no tool "
                          "calls from this model's output (--tool-call-parser none).")
    return forced_call_grammar([t.function for t in tools], choice.name, parser,
                               parallel=choice.parallel and choice.name is None)


def new_tool_use_id() -> str:
    return "toolu_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")


class Blocks:
    """The answer's content blocks, built from text deltas as the engine makes them.

    ``eager``: open the text block before any text (the plain, tool-less stream, whose
    first block is always text). Each method returns the stream events it completed;
    ``content`` is the blocks so far, as the non-streamed response sends them."""

    def __init__(self, parser: ToolParser | None, choice: ToolChoice | None,
                 eager: bool = False) -> None:
        reads_calls = choice is not None and choice.kind != "none"
        self.stream = ToolStream(parser if reads_calls else None)
        self.single = choice is not None and not choice.parallel
        self.content: list[dict[str, Any]] = []
        self.calls = 0
        self._open = False
        self._eager = eager

    def opening(self) -> list[Event]:
        return self._start({"type": "text", "text": ""}) if self._eager else []

    def feed(self, piece: str) -> list[Event]:
        return self._take(self.stream.feed(piece))

    def finish(self) -> list[Event]:
        events = self._take(self.stream.finish())
        if not self.content:  # nothing at all: one empty text block, as without tools
            events += self._start({"type": "text", "text": ""})
        events += self._close()
        return events

    def _take(self, deltas: list[str | ToolCallDelta]) -> list[Event]:
        events: list[Event] = []
        for d in deltas:
            if isinstance(d, str):
                if not d:
                    continue
                if not (self._open and self.content[-1]["type"] == "text"):
                    events += self._close() + self._start({"type": "text", "text": ""})
                self.content[-1]["text"] += d
                events.append(("content_block_delta", {
                    "type": "content_block_delta", "index": len(self.content) - 1,
                    "delta": {"type": "text_delta", "text": d}}))
            elif not (self.single and self.calls):
                events += self._call(d)
        return events

    def _call(self, d: ToolCallDelta) -> list[Event]:
        self.calls += 1
        block = {"type": "tool_use", "id": new_tool_use_id(), "name": d.call.name, "input": {}}
        events = self._close() + self._start(dict(block))
        self.content[-1]["input"] = json.loads(d.call.arguments)
        events.append(("content_block_delta", {
            "type": "content_block_delta", "index": len(self.content) - 1,
            "delta": {"type": "input_json_delta", "partial_json": d.call.arguments}}))
        return events + self._close()

    def _start(self, block: dict[str, Any]) -> list[Event]:
        self.content.append(block)
        self._open = True
        return [("content_block_start", {"type": "content_block_start",
                                         "index": len(self.content) - 1,
                                         "content_block": dict(block)})]

    def _close(self) -> list[Event]:
        if not self._open:
            return []
        self._open = False
        return [("content_block_stop", {"type": "content_block_stop",
                                        "index": len(self.content) - 1})]
