"""What crosses the boundary between the asyncio side and the engine thread, and how the
asyncio side reads a request's events (``read_events``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvgate.gateway.engine.sampling import SamplingParams, TokenLogprob
from kvgate.gateway.usage import CacheDetail, Usage

if TYPE_CHECKING:
    from kvgate.gateway.engine.structured import StructuredSpec


class EngineError(Exception):
    """Base of the errors a client can be told about."""


class EngineMisconfigured(EngineError, ValueError):
    """Settings the engine cannot run with (a KV pool too small for them): one line at start."""


class PromptTooLong(EngineError):
    """The prompt (plus room for one output token) can never fit: context length or pool."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the client should retry later."""


class InvalidTokens(EngineError):
    """A prompt token id the model does not have (negative, or not below its vocabulary
    size); the message names the first one and its position."""

    def __init__(self, position: int, token_id: object, vocab_size: int) -> None:
        super().__init__(
            f"prompt token {position} is {token_id!r}; token ids must be integers in "
            f"[0, {vocab_size}) for this model"
        )
        self.position = position
        self.token_id = token_id


class InvalidGrammar(EngineError):
    """A structured-output spec (JSON schema, regex, Lark grammar) that does not compile."""


class EngineUnavailable(EngineOverloaded):
    """The engine core process is down (it stopped, and is being restarted): retry shortly."""


def check_prompt(num_prompt_tokens: int, max_model_len: int, block_size: int,
                 device_pages: int) -> None:
    """Reject a prompt that can never run, whatever else is going on."""
    if num_prompt_tokens == 0:
        raise PromptTooLong("the prompt is empty; send at least one token")
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLong(
            f"the prompt has {num_prompt_tokens} tokens; this model's context is "
            f"{max_model_len} tokens, including at least one output token. Shorten the prompt."
        )
    pages = -(-(num_prompt_tokens + 1) // block_size)
    if pages > device_pages:
        raise PromptTooLong(
            f"the prompt has {num_prompt_tokens} tokens and needs {pages} KV pages; the device "
            f"cache holds {device_pages} pages in all. Shorten the prompt or raise "
            "--device-cache-bytes."
        )


def check_token_ids(ids: list[int], vocab: int) -> None:
    """Every id an ``int`` the model can embed; else ``InvalidTokens`` names the first."""
    # C-speed checks first (a long prompt is checked on the event loop), then the search
    if not ids or (set(map(type, ids)) <= {int} and min(ids) >= 0 and max(ids) < vocab):
        return
    for position, token in enumerate(ids):
        if type(token) is not int or not 0 <= token < vocab:
            raise InvalidTokens(position, token, vocab)


def check_request(request: GenerateRequest, *, max_model_len: int, block_size: int,
                  device_pages: int, vocab_size: int,
                  compile_grammar: Callable[[StructuredSpec], object],
                  queue_depth: int, max_queue: int) -> None:
    """The engine's refusals before anything is queued: ``PromptTooLong``,
    ``InvalidTokens``, ``InvalidGrammar`` (a compiled grammar is cached), ``EngineOverloaded``."""
    check_prompt(len(request.prompt_token_ids), max_model_len, block_size, device_pages)
    check_token_ids(request.prompt_token_ids, vocab_size)
    if request.sampling.structured is not None:
        compile_grammar(request.sampling.structured)
    if queue_depth >= max_queue:
        raise EngineOverloaded(f"{queue_depth} requests are waiting for the engine; retry shortly")


class SequenceFailed(Exception):
    """The engine failed this request (its ``__cause__`` says why); ``usage`` is what it did
    until then, the prompt's real cache split included, so the request can be billed."""

    def __init__(self, usage: Usage, error: BaseException) -> None:
        super().__init__(f"the engine failed this request: {error}")
        self.usage = usage


@dataclass(frozen=True)
class WireError:
    """An exception as it crosses the process boundary: its class's name, message and
    attributes. ``error()`` rebuilds an ``EngineError`` subclass it names as that class (so
    the API server answers as it would in one process); any other as ``EngineFailure``."""

    kind: str
    message: str
    attrs: dict[str, int | str | float] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        attrs = {k: v for k, v in vars(exc).items() if isinstance(v, (int, str, float))}
        return cls(type(exc).__name__, str(exc), attrs)

    def error(self) -> Exception:
        known = {c.__name__: c for c in _subclasses(EngineError)}
        kind = known.get(self.kind, EngineFailure)
        exc = kind.__new__(kind)
        Exception.__init__(exc, self.message if kind is not EngineFailure
                           else f"{self.kind}: {self.message}")
        exc.__dict__.update(self.attrs)
        return exc

    def line(self) -> str:
        return f"{self.kind} {self.message}".replace("\n", " ")


class EngineFailure(RuntimeError):
    """A failure inside the engine core process that is not one of the engine's refusals."""


def _subclasses(cls: type[Exception]) -> list[type[Exception]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


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
    # Fair scheduling (``engine/fairness.py``): the account whose virtual token counter
    # this request advances ("" = its namespace), that account's weight (its plan's
    # ``scheduling_weight``: a weight-2 tenant gets twice the tokens of a weight-1 one
    # while both are backlogged), the request's priority class (lower runs first, as
    # vLLM's ``priority``; the HTTP layer bounds it by the tenant's ``min_priority``) and
    # the most sequences the account may have running at once (0: no cap of its own).
    tenant: str = ""
    weight: float = 1.0
    priority: int = 0
    max_running: int = 0


@dataclass
class TokenEvent:
    text: str
    token_ids: list[int]
    # On the first token only: the usage so far. Its prompt side (cached and cache-write
    # tokens) is final by then, so a stream can report it up front.
    prompt_usage: Usage | None = None
    prompt_cache: CacheDetail | None = None  # with prompt_usage: the blocks behind it
    index: int = 0  # which of the request's ``n`` choices
    # With ``SamplingParams.logprobs``: one entry per token of ``token_ids``
    logprobs: list[TokenLogprob] | None = None
    # The choice's last token is in ``token_ids`` (its finish follows): the text still
    # held back (an incomplete character) is flushed with it
    final: bool = False


@dataclass
class FinishEvent:
    usage: Usage
    finish_reason: str  # stop | length | cancelled
    ttft_s: float | None = None  # arrival to the first sampled token, on the engine's clock
    engine_s: float = 0.0  # arrival to the finish
    stop_sequence: str | None = None  # the stop string that ended the output, if one did
    index: int = 0  # which of the request's ``n`` choices; a request ends after n finishes
    cache: CacheDetail = field(default_factory=CacheDetail)  # the blocks behind ``usage``


@dataclass
class ErrorEvent:
    """Internal: an error raised on the engine thread, re-raised by ``generate()``."""

    error: BaseException
    usage: Usage | None = None  # what the request did until then (None: never admitted)


# What the engine thread sends to one request's listener.
EngineEvent = TokenEvent | FinishEvent | ErrorEvent

# A token event with more ids than this (a request that does not stream gets its whole
# output as one) has its text made on a worker thread, not on the event loop: thousands
# of ids take milliseconds to tens of milliseconds to decode token by token. Bounded: a
# flood of such outputs queues here, not on the default executor (DNS lookups use it).
INLINE_TEXT_IDS = 64
_TEXT = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvgate-text")


async def read_events(events: asyncio.Queue[EngineEvent], n: int,
                      on_token: Callable[[TokenEvent], None], cancel: Callable[[], None],
                      text: Callable[[TokenEvent], str] | None = None
                      ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
    """One request's events as ``generate`` yields them: token events (each told to
    ``on_token`` as it is read), then one ``FinishEvent`` per choice (``n``). An
    ``ErrorEvent`` is raised: its error as it is, or as ``SequenceFailed`` when it carries
    the usage so far. A reader that leaves before the end (closed or cancelled) calls
    ``cancel``; close this generator when done (``contextlib.aclosing``). ``text``: makes the
    token events' text here, from their ids (the engine sent none: ``tokenizer.TextStream``),
    off the event loop for a long event (``INLINE_TEXT_IDS``)."""
    finished = False
    remaining = n
    try:
        while True:
            ev = await events.get()
            if isinstance(ev, TokenEvent):
                on_token(ev)  # first: counted even if the core is lost while its text is made
                if text is not None:
                    ev.text = (text(ev) if len(ev.token_ids) <= INLINE_TEXT_IDS
                               else await asyncio.get_running_loop().run_in_executor(
                                   _TEXT, text, ev))
            if isinstance(ev, ErrorEvent):
                finished = True
                if ev.usage is None:
                    raise ev.error
                raise SequenceFailed(ev.usage, ev.error) from ev.error
            yield ev
            if isinstance(ev, FinishEvent):
                remaining -= 1
                if remaining == 0:
                    finished = True
                    return
    finally:
        if not finished:
            cancel()
