"""The engine: a transformers model on paged KV, continuous batching, prefix reuse.

What the server and the HTTP layer use, importable without torch (``Engine`` is loaded on
first use). A map of the package's files: docs/architecture.md, "Engine".
"""

from typing import TYPE_CHECKING, TypeAlias

from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.request import (
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    FinishEvent,
    GenerateRequest,
    InvalidGrammar,
    InvalidTokens,
    PromptTooLong,
    SequenceFailed,
    TokenEvent,
)
from kvgate.gateway.engine.sampling import SamplingParams
from kvgate.gateway.engine.structured import StructuredSpec, json_schema_spec

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineOverloaded",
    "EngineUnavailable",
    "FinishEvent",
    "GenerateRequest",
    "InvalidGrammar",
    "InvalidTokens",
    "PromptTooLong",
    "SamplingParams",
    "SequenceFailed",
    "StructuredSpec",
    "TokenEvent",
    "json_schema_spec",
]


if TYPE_CHECKING:
    from kvgate.gateway.engine.client import EngineClient
    from kvgate.gateway.engine.engine import Engine

    # What the HTTP layer serves from: the engine in this process, or the engine core
    # process through its client (both have the same facade).
    EngineApi: TypeAlias = Engine | EngineClient


def __getattr__(name: str) -> object:
    # Engine pulls in torch, transformers and the cachestore; request types alone do not.
    if name == "Engine":
        from kvgate.gateway.engine.engine import Engine

        return Engine
    raise AttributeError(name)
