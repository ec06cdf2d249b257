"""Sampling parameters: what a request asks of the sampler (``sampler.py`` applies them).

Penalties follow HF/vLLM (``repetition_penalty``, over prompt and output) and OpenAI
(``frequency_penalty``, ``presence_penalty``, over the output). Log probabilities
(``logprobs``) are the model's own distribution, before bias, penalties, temperature and
filters, as vLLM returns them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvgate.gateway.engine.sampler import TokenLogprob

__all__ = ["MAX_LOGPROBS", "SamplingParams", "TokenLogprob"]

if TYPE_CHECKING:
    from kvgate.gateway.engine.structured import StructuredSpec

# Below this, dividing logits by the temperature overflows fp32; sampling is argmax anyway.
MIN_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # alternatives per token, OpenAI's bound for top_logprobs


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    # None: no log probabilities; k >= 0: the chosen token's plus the k most likely
    logprobs: int | None = None
    n: int = 1  # samples of the same prompt, sharing its prefill
    # Structured outputs: the output must match this JSON schema / regex / grammar
    structured: StructuredSpec | None = None
    # (open, close) markers of a tool call: a call that repeats an earlier one of the same
    # answer word for word ends the output where it begins (a small model under a calls
    # grammar otherwise writes the same call until max_tokens)
    repeat_block: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if self.n < 1:
            raise ValueError("n must be at least 1")

    @property
    def greedy(self) -> bool:
        # A temperature this small, or a nucleus of zero mass, leaves only the top token.
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1 or self.top_p == 0

    def ends_on(self, token_id: int, eos_token_ids: list[int]) -> bool:
        """Whether ``token_id`` ends the output (``stop``), never sent as text: the model's
        end token unless ``ignore_eos``, or one of ``stop_token_ids``."""
        return ((not self.ignore_eos and token_id in eos_token_ids)
                or token_id in self.stop_token_ids)

    @property
    def reads_text(self) -> bool:
        """Whether where the output ends depends on its text (stop strings, a repeated tool
        call): the engine then detokenizes it. Otherwise it ends on ids alone (an end token,
        the token limit, a complete grammar) and its text is made where it is read
        (``tokenizer.TextStream``), not on the engine's step."""
        return bool(self.stop) or self.repeat_block is not None

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    def seed_of(self, index: int) -> int | None:
        """Choice ``index`` of ``n`` samples draws from ``seed + index`` (vLLM's rule), so a
        request with n=3 gives the choices three n=1 requests with those seeds give."""
        return None if self.seed is None else self.seed + index
