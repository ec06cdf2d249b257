"""The engine and ledger names the HTTP layer uses, imported in one place."""

from __future__ import annotations

from gateway.engine import (
    Engine,
    EngineConfig,
    EngineOverloaded,
    FinishEvent,
    GenerateRequest,
    PromptTooLong,
    SamplingParams,
    TokenEvent,
)
from gateway.ledger import Conflict, Ledger, LedgerError, NotFound, Principal, UsageEvent

__all__ = [
    "Conflict", "Engine", "EngineConfig", "EngineOverloaded", "FinishEvent", "GenerateRequest",
    "Ledger", "LedgerError", "NotFound", "Principal", "PromptTooLong", "SamplingParams",
    "TokenEvent", "UsageEvent",
]
