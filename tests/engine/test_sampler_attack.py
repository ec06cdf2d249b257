"""The batched sampler under hostile parameters: a seeded row draws the same token whatever
shares its batch (bf16 logits, with their many ties, included), and every filter agrees
with the plain rule computed on the one row."""

from __future__ import annotations

import random

import pytest
import torch

from kvgate.gateway.engine.sampler import SampleRow, sample, uniforms
from kvgate.gateway.engine.sampling import SamplingParams


def test_a_seeded_top_k_row_ignores_how_wide_another_rows_top_k_is() -> None:
    # bf16 logits tie a lot; a sort and a topk order ties differently, and which one runs
    # depended on the other rows' top_k
    torch.manual_seed(0)
    vocab = 20000
    logits = (torch.randn(2, vocab) * 0.5).to(torch.bfloat16)
    mine = SamplingParams(temperature=1.0, top_k=2000, seed=5)
    wide = SamplingParams(temperature=1.0, top_k=10000)
    for pos in range(32):
        u = float(uniforms([5], [pos])[0])
        alone = sample(logits[:1], [SampleRow(mine, (), 0, u)]).item()
        batched = sample(logits, [SampleRow(mine, (), 0, u), SampleRow(wide, (), 0, 0.5)])
        assert batched[0].item() == alone


def _reference(logits: torch.Tensor, p: SamplingParams, u: float) -> int:
    """One row, by the rules: bias, temperature, min_p, top_k and top_p on the sorted row
    (ties with the last kept token kept), then the draw in token-id order."""
    x = logits.float().clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    if p.greedy:
        return int(x.argmax())
    x = (x - x.max()) / p.temperature
    if p.min_p > 0:
        x[x < torch.log(torch.tensor(p.min_p))] = float("-inf")
    vals = torch.sort(x, descending=True).values
    if 0 < p.top_k < len(x):
        vals[vals < vals[p.top_k - 1]] = float("-inf")
    if p.top_p < 1:
        probs = torch.softmax(vals, -1)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False
        vals[drop] = float("-inf")
    x = x.masked_fill(x < vals[vals > float("-inf")].min(), float("-inf"))
    cdf = torch.softmax(x, -1).cumsum(-1)
    return min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])]))[0]), len(x) - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_batches_match_the_rule_row_by_row(dtype: torch.dtype) -> None:
    rng = random.Random(1)
    torch.manual_seed(1)
    for trial in range(40):
        vocab = rng.choice([50, 263, 3000, 20000])
        batch = rng.randint(1, 10)
        logits = (torch.randn(batch, vocab) * rng.choice([0.01, 0.1, 1, 5, 30])).to(dtype)
        rows = []
        for _ in range(batch):
            p = SamplingParams(
                temperature=rng.choice([0, 1e-6, 0.3, 1, 2]),
                top_p=rng.choice([1, 1, 0.5, 0.95, 0.999, 1e-4]),
                top_k=rng.choice([0, 0, 1, 5, 2000, vocab, vocab + 10, 2**62]),
                min_p=rng.choice([0, 0, 0.05, 1]),
                logit_bias=rng.choice([{}, {0: 100.0}, {i: -100.0 for i in range(1, vocab)}]))
            u = float(uniforms([rng.getrandbits(64)], [trial])[0])
            rows.append(SampleRow(p, (), 0, u))
        got = sample(logits, rows).tolist()
        for i, row in enumerate(rows):
            assert got[i] == sample(logits[i : i + 1], [row]).item()
            assert got[i] == _reference(logits[i], row.params, row.uniform)


def test_extreme_seeds_give_uniforms_strictly_inside_zero_one() -> None:
    seeds = [0, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1]
    u = uniforms(seeds, [0, 1, 2, 3, 2**40, 7])
    assert ((u > 0) & (u < 1)).all()
    assert uniforms([-1], [3])[0] == uniforms([2**64 - 1], [3])[0]  # the same 64-bit stream
