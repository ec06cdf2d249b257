"""Sampling parameters and the choice of the next token from one row of logits.

Each request with a seed owns a ``torch.Generator``, so its tokens do not depend on what
else shares the batch: the same seed gives the same text whether it ran alone or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this, dividing logits by the temperature overflows fp32; sampling is argmax anyway.
MIN_TEMPERATURE = 1e-5


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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        # A temperature this small, or a nucleus of zero mass, leaves only the top token.
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1 or self.top_p == 0

    def make_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed)
        return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """``logits``: [vocab] fp32 on the CPU. Greedy is argmax; otherwise temperature, top-k, top-p."""
    if params.greedy:
        return int(torch.argmax(logits))
    # Shift so the largest score is 0 before scaling: a small temperature cannot overflow.
    scores = (logits - logits.max()) / params.temperature
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
