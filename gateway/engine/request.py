"""What crosses the boundary between the asyncio side and the engine thread."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.engine.sampling import SamplingParams


class EngineError(Exception):
    """Base of the errors a client can be told about."""


class PromptTooLong(EngineError):
    """The prompt (plus room for one output token) can never fit: context length or pool."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the client should retry later."""


@dataclass
class GenerateRequest:
    request_id: str
    namespace: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ttl_segments: list[tuple[int, float]] = field(default_factory=list)
    default_ttl_s: float | None = None
    # False: the caller wants only the whole answer, so the engine sends the tokens as one
    # TokenEvent just before the finish instead of one event (one wake-up) per token.
    stream: bool = True


@dataclass
class EngineUsage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    engine_s: float = 0.0
    finish_reason: str | None = None

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


@dataclass
class TokenEvent:
    text: str
    token_ids: list[int]
    # On the first token only: a copy of the usage so far. Its prompt side (cached and
    # cache-write tokens) is final by then, so a stream can report it up front.
    prompt_usage: EngineUsage | None = None


@dataclass
class FinishEvent:
    usage: EngineUsage
    finish_reason: str  # stop | length | cancelled


@dataclass
class ErrorEvent:
    """Internal: an error raised on the engine thread, re-raised by ``generate()``."""

    error: BaseException
