"""Sampling parameters and the choice of the next token from one row of logits.

Each request with a seed owns a ``torch.Generator``, so its tokens do not depend on what
else shares the batch: the same seed gives the same text whether it ran alone or not.

The row goes through the processors in vLLM's order: ``logit_bias``, then the penalties
(``repetition_penalty`` over prompt and output, HF/vLLM semantics; ``frequency_penalty``
and ``presence_penalty`` over the output, OpenAI semantics), then temperature, ``min_p``,
``top_k`` and ``top_p``. Greedy decoding is the argmax of the biased and penalised row.

Log probabilities (``logprobs``) are those of the model's own distribution — the
log-softmax of the raw logits, before bias, penalties, temperature and filters — as vLLM
returns them by default: they say what the model thought, not how it was steered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gateway.engine.structured import StructuredSpec

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

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    def seed_of(self, index: int) -> int | None:
        """Choice ``index`` of ``n`` samples draws from ``seed + index`` (vLLM's rule), so a
        request with n=3 gives the choices three n=1 requests with those seeds give."""
        return None if self.seed is None else self.seed + index

    def make_generator(self, index: int = 0) -> torch.Generator | None:
        seed = self.seed_of(index)
        if seed is None:
            return None
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        return gen


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log probability and the ``k`` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def process(logits: torch.Tensor, params: SamplingParams, token_ids: Sequence[int] = (),
            num_prompt: int = 0) -> torch.Tensor:
    """``logit_bias`` and the penalties applied to one row (a new tensor when any applies).
    ``token_ids`` is prompt + output so far, the first ``num_prompt`` of them the prompt."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        bias = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
        logits = logits.clone()
        logits.index_add_(0, ids, bias)
    if params.repetition_penalty != 1.0 and token_ids:
        seen = torch.tensor(list(token_ids), dtype=torch.long).unique()
        scores = logits[seen]
        p = params.repetition_penalty
        logits = logits.clone()
        logits[seen] = torch.where(scores > 0, scores / p, scores * p)
    if (params.presence_penalty or params.frequency_penalty) and len(token_ids) > num_prompt:
        counts = torch.bincount(torch.tensor(list(token_ids[num_prompt:]), dtype=torch.long),
                                minlength=logits.numel())[: logits.numel()].to(logits.dtype)
        logits = (logits - params.frequency_penalty * counts
                  - params.presence_penalty * (counts > 0).to(logits.dtype))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           token_ids: Sequence[int] = (), num_prompt: int = 0) -> int:
    """``logits``: [vocab] fp32 on the CPU. Bias and penalties, then greedy is argmax;
    otherwise temperature, min-p, top-k, top-p."""
    logits = process(logits, params, token_ids, num_prompt)
    if params.greedy:
        return int(torch.argmax(logits))
    # Shift so the largest score is 0 before scaling: a small temperature cannot overflow.
    scores = (logits - logits.max()) / params.temperature
    if params.min_p > 0:
        # p < min_p * p_max  ⇔  score < log(min_p) (the top score is 0 after the shift)
        scores = scores.masked_fill(scores < torch.log(torch.tensor(params.min_p)),
                                    float("-inf"))
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token once the tokens before it already cover top_p
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False  # the top token always stays (a top_p below fp32's range rounds to 0)
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """The raw model distribution's log probability of ``token_id`` and its top ``k``."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(lp[token_id]), top)
