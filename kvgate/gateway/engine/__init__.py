"""The engine: a transformers model on paged KV, continuous batching, prefix reuse.

What the server and the HTTP layer use, importable without torch (``Engine`` is loaded on
first use). A map of the package's files: docs/architecture.md, "Engine".
"""

from typing import TYPE_CHECKING

from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.request import (
    EngineError,
    EngineOverloaded,
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
    from kvgate.gateway.engine.engine import Engine


def __getattr__(name: str) -> object:
    # Engine pulls in torch, transformers and the cachestore; request types alone do not.
    if name == "Engine":
        from kvgate.gateway.engine.engine import Engine

        return Engine
    raise AttributeError(name)
