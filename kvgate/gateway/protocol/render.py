"""What prompt building needs of a model, typed: the chat template over messages and tools
(the engine's ``render_chat``, or the router's tokenizer standing in for it), and a
grammar compiler that says whether a structured-output spec can be enforced."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvgate.gateway.engine.structured import StructuredSpec


class ChatRenderer(Protocol):
    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]: ...


class GrammarCompiler(Protocol):
    def compile(self, spec: StructuredSpec) -> Any: ...
