"""The engine: a transformers model on paged KV, continuous batching, prefix reuse.

One concept per file:

- ``config.py``     EngineConfig (the server maps its settings onto it)
- ``demo.py``       the built-in demo model (random weights) and byte-level tokenizer
- ``loader.py``     ``--model demo|bench|PATH``: offline loading, clear missing-file errors
- ``tokenizer.py``  tokenizer + chat template + incremental detokenizer
- ``attention.py``  our paged attention, registered with transformers
- ``sequence.py``   one request's tokens, progress, pages, and stop handling
- ``sampling.py``   SamplingParams, and one row through the sampler (tests, tools)
- ``sampler.py``    the step's batched sampling on the device, the seeded draw stream
- ``structured.py`` StructuredSpec: the JSON schema / regex / grammar an output must match
- ``grammar.py``    compiles those (llguidance) and masks each step's logits in one op
- ``scheduler.py``  continuous batching, chunked prefill, admission, preemption
- ``runner.py``     one step as one packed varlen forward; inputs built with array ops
- ``graphs.py``     CUDA graphs of the decode step (CUDA with Triton only)
- ``commands.py``   the typed messages the asyncio side sends the engine thread
- ``request.py``    what crosses into and out of the engine: requests, events, errors
- ``engine.py``     the engine thread and the asyncio facade
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
