"""One step's sampling: every row of a ``[batch, vocab]`` logits tensor, where it lives, in a
few tensor ops, each row with its own parameters (vLLM's order: ``logit_bias``, penalties,
temperature, ``min_p``, ``top_k``, ``top_p``; greedy rows take the argmax of the biased and
penalised row). Only the sampled ids and the requested log probabilities leave the device.

Each draw is inverse-CDF sampling with one uniform per row (``uniforms``: a splitmix64 hash
of the sequence's seed and output position), so a seeded request's tokens do not depend on
its batch. ``top_k``/``top_p`` rows are drawn among their ``CANDIDATES`` best tokens, with a
full sort where a nucleus is wider: exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


class RowParams(Protocol):
    """What the sampler reads of a row's parameters (``sampling.SamplingParams`` has it;
    a protocol so the sampler does not import the layer above it)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[int, float]

    @property
    def greedy(self) -> bool: ...

    @property
    def penalised(self) -> bool: ...

CANDIDATES = 1024  # tokens considered per top_k/top_p row before the full-sort fallback
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs look independent."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def uniforms(seeds: Sequence[int], counters: Sequence[int]) -> np.ndarray:
    """float32 in (0, 1): draw number ``counters[i]`` of the stream seeded ``seeds[i]``."""
    s = np.array([x & _MASK64 for x in seeds], dtype=np.uint64)
    c = np.array(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix(_mix(s) + (c + np.uint64(1)) * _GOLDEN)
    # 24 bits (what float32 holds), centred in their interval: never 0, never 1
    return (((z >> np.uint64(40)).astype(np.float64) + 0.5) * 2.0**-24).astype(np.float32)


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log probability and the ``k`` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SampleRow:
    """What one row of the batch samples with: its parameters, its tokens so far (prompt
    then output; the penalties read them) and its uniform for this draw."""

    params: RowParams
    token_ids: Sequence[int] = ()
    num_prompt: int = 0
    uniform: float = 0.5


def _put(data: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data on ``device``. On CUDA through pinned memory and without blocking: a copy
    from pageable memory would wait for the forward still running on the stream."""
    host = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _processed(rows: Sequence[SampleRow]) -> bool:
    return any(r.params.logit_bias or (r.params.penalised and r.token_ids) for r in rows)


def process(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """``logit_bias`` and the penalties of every row; ``logits`` is left as it is (a new
    fp32 tensor is returned when any row has one of them)."""
    if not _processed(rows):
        return logits
    scores = logits.to(torch.float32, copy=True)
    _process_(scores, rows)
    return scores


def _process_(scores: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """``process`` in place, on fp32 rows the caller owns."""
    vocab = scores.shape[1]
    device = scores.device
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and r.token_ids]
    freq = [i for i, r in enumerate(rows) if (r.params.presence_penalty or r.params.frequency_penalty)
            and len(r.token_ids) > r.num_prompt]
    if biased:
        r_idx = [i for i in biased for _ in rows[i].params.logit_bias]
        t_idx = [t for i in biased for t in rows[i].params.logit_bias]
        vals = [v for i in biased for v in rows[i].params.logit_bias.values()]
        if not 0 <= min(t_idx) <= max(t_idx) < vocab:  # checked here: on CUDA an
            # out-of-range index is a device assert that takes the whole process down
            raise ValueError(f"logit_bias names a token outside [0, {vocab})")
        scores.index_put_((_put(r_idx, torch.long, device), _put(t_idx, torch.long, device)),
                          _put(vals, scores.dtype, device), accumulate=True)
    if rep:
        seen = _occurrences(rep, [rows[i].token_ids for i in rep], vocab, device) > 0
        p = _put([rows[i].params.repetition_penalty for i in rep], scores.dtype, device)[:, None]
        idx = _put(rep, torch.long, device)
        sub = _rows(scores, rep, idx)
        sub = torch.where(seen, torch.where(sub > 0, sub / p, sub * p), sub)
        scores.index_copy_(0, idx, sub)
    if freq:
        counts = _occurrences(freq, [rows[i].token_ids[rows[i].num_prompt:] for i in freq],
                              vocab, device).to(scores.dtype)
        fp = _put([[rows[i].params.frequency_penalty, rows[i].params.presence_penalty]
                   for i in freq], scores.dtype, device)
        idx = _put(freq, torch.long, device)
        sub = _rows(scores, freq, idx)
        sub = sub - fp[:, :1] * counts - fp[:, 1:] * (counts > 0).to(scores.dtype)
        scores.index_copy_(0, idx, sub)


def _occurrences(which: list[int], histories: list[Sequence[int]], vocab: int,
                 device: torch.device) -> torch.Tensor:
    """``[len(which), vocab]`` int32: how often each id occurs in each history (one
    scatter over a padded id matrix; padding lands in a column that is cut off)."""
    width = max(1, max(len(h) for h in histories))
    ids = np.full((len(which), width), vocab, dtype=np.int64)
    for row, h in enumerate(histories):
        ids[row, : len(h)] = h
    index = _put(torch.from_numpy(ids), torch.long, device)
    counts = torch.zeros(len(which), vocab + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts[:, :vocab]


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """The next token of every row, ``[batch]`` int64 on the logits' device.
    ``logits``: ``[batch, vocab]``, any float dtype; it is not modified."""
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    device = logits.device
    vocab = logits.shape[1]
    out = torch.empty(len(rows), dtype=torch.long, device=device)
    if greedy:
        picked = [rows[i] for i in greedy]
        scores = _rows(logits, greedy)
        if _processed(picked):
            scores = scores.to(torch.float32, copy=scores.data_ptr() == logits.data_ptr())
            _process_(scores, picked)
        ids = scores.argmax(dim=-1)
        if not drawn:
            return ids
        out.index_copy_(0, _put(greedy, torch.long, device), ids)
    # per row: temperature, log(min_p), top_k (vocab: off), top_p, uniform; one copy
    table = _put([[r.params.temperature, r.params.min_p, r.params.top_k
                   if 0 < r.params.top_k < vocab else vocab, r.params.top_p, r.uniform]
                  for r in (rows[i] for i in drawn)], torch.float64, device)
    # the drawn rows, in fp32, owned: everything below works on them in place
    sub = _rows(logits, drawn)
    sub = sub.to(torch.float32, copy=sub.data_ptr() == logits.data_ptr())
    _process_(sub, [rows[i] for i in drawn])
    # Shift so the largest score is 0 before scaling: a small temperature cannot overflow.
    sub.sub_(sub.amax(dim=-1, keepdim=True)).div_(table[:, :1].float())
    if any(rows[i].params.min_p > 0 for i in drawn):
        # p < min_p * p_max  ⇔  score < log(min_p) (the top score is 0 after the shift)
        sub.masked_fill_(sub < torch.log(table[:, 1:2]).float(), float("-inf"))
    filtered = [j for j, i in enumerate(drawn)
                if 0 < rows[i].params.top_k < vocab or rows[i].params.top_p < 1.0]
    picks = torch.empty(len(drawn), dtype=torch.long, device=device)
    rest = list(range(len(drawn)))
    if filtered:
        params = [rows[drawn[j]].params for j in filtered]
        # only a top_p row without top_k can have a nucleus wider than its candidates
        open_nucleus = any(p.top_p < 1.0 and not 0 < p.top_k < vocab for p in params)
        done = _sample_filtered(sub, table, filtered, picks, max(p.top_k for p in params),
                                open_nucleus)
        rest = [j for j in rest if j not in done]
    if rest:
        _sample_full(sub, table, rest, picks)
    if not greedy:
        return picks
    return out.index_copy_(0, _put(drawn, torch.long, device), picks)


def _rows(t: torch.Tensor, rows: list[int], index: torch.Tensor | None = None) -> torch.Tensor:
    """Those rows of ``t``: ``t`` itself when they are all of it, else a copy."""
    if len(rows) == t.shape[0]:
        return t
    return t.index_select(0, _put(rows, torch.long, t.device) if index is None else index)


def _inverse_cdf(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column of each row's draw: the first whose cumulative probability reaches ``u`` of
    the row's total. ``u`` in (0, 1): a token of probability 0 is never taken."""
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    target = (u.float() * cdf[:, -1]).unsqueeze(1).contiguous()
    col = torch.searchsorted(cdf.contiguous(), target, right=False).squeeze(1)
    return col.clamp_(max=scores.shape[1] - 1)


def _sample_filtered(sub: torch.Tensor, table: torch.Tensor, filtered: list[int],
                     picks: torch.Tensor, max_k: int, open_nucleus: bool) -> set[int]:
    """top_k/top_p rows drawn among their best ``CANDIDATES`` tokens (or ``max_k``); the
    rows whose nucleus is wider are drawn by a full sort. Returns the rows it drew."""
    vocab = sub.shape[1]
    scores = _rows(sub, filtered)
    params = _rows(table, filtered)
    width = min(vocab, max(CANDIDATES, max_k))
    if width * 4 >= vocab:  # a sort beats a topk this wide (a small vocabulary)
        vals = _sorted_best_first(scores)
        width = vocab
    else:
        vals = scores.topk(width, dim=-1).values  # sorted, best first
    k = params[:, 2].long()
    has_k = k < vocab
    k = k.clamp(max=width)
    kth = vals.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    # every token as good as the k-th stays (ties included), as a plain top_k would keep
    vals = vals.masked_fill(has_k.unsqueeze(1) & (vals < kth), float("-inf"))
    top_p = params[:, 3].float()
    total = torch.where(has_k, torch.logsumexp(vals, dim=-1), torch.logsumexp(scores, dim=-1))
    probs = torch.exp(vals - total.unsqueeze(1))
    cum = probs.cumsum(dim=-1)
    nucleus = top_p < 1.0
    # drop a token once the tokens before it already cover top_p; the top token stays
    drop = nucleus.unsqueeze(1) & ((cum - probs) >= top_p.unsqueeze(1))
    drop[:, 0] = False
    vals = vals.masked_fill(drop, float("-inf"))
    # a top_p row without top_k whose candidates do not reach top_p: its cut lies beyond
    wide = nucleus & ~has_k & (cum[:, -1] < top_p) & (width < vocab)
    picks.index_copy_(0, _put(filtered, torch.long, sub.device), _draw_above(scores, vals, params))
    if not open_nucleus:
        return set(filtered)
    # one sync (the rows' ids must come back to the host right after anyway)
    wide_rows = [filtered[j] for j in torch.nonzero(wide).flatten().tolist()]
    if wide_rows:
        _sample_sorted(sub, table, wide_rows, picks)
    return set(filtered)


def _sample_sorted(sub: torch.Tensor, table: torch.Tensor, rows: list[int],
                   picks: torch.Tensor) -> None:
    """top_p over the whole sorted row: the exact rule for a nucleus of any width."""
    scores = _rows(sub, rows)
    params = _rows(table, rows)
    vals = _sorted_best_first(scores)
    probs = torch.softmax(vals, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= params[:, 3:4].float()
    drop[:, 0] = False
    vals = vals.masked_fill(drop, float("-inf"))
    picks.index_copy_(0, _put(rows, torch.long, sub.device), _draw_above(scores, vals, params))


def _sorted_best_first(scores: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first. A CPU fp32 batch is sorted by numpy: torch's CPU
    sort costs ~10x more on the small rows a step has (32 x 263: 240 vs 21 µs); the values
    are the same either way."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        return torch.from_numpy(-np.sort(-scores.numpy(), axis=-1))
    return torch.sort(scores, dim=-1, descending=True).values


def _draw_above(scores: torch.Tensor, kept: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The draw of each row among its tokens scoring at least its smallest ``kept`` score
    (``kept``: sorted best first, the filtered-out ones -inf), in vocabulary order. The
    order among equal scores of a ``sort`` or ``topk`` depends on how wide it was, which
    depends on the rest of the batch; a cut by value, drawn in token-id order, does not
    (ties with the last kept token stay, as ``top_k`` keeps them): a seeded request gets
    the same tokens whatever shares its batch, bf16 logits' many ties included."""
    cut = kept.masked_fill(kept == float("-inf"), float("inf")).amin(dim=-1, keepdim=True)
    return _inverse_cdf(scores.masked_fill(scores < cut, float("-inf")), params[:, 4])


def _sample_full(sub: torch.Tensor, table: torch.Tensor, rows: list[int],
                 picks: torch.Tensor) -> None:
    """Rows without top_k/top_p: one draw over the whole (min_p-filtered) row."""
    scores = _rows(sub, rows)
    params = _rows(table, rows)
    picks.index_copy_(0, _put(rows, torch.long, sub.device), _inverse_cdf(scores, params[:, 4]))


def logprobs(logits: torch.Tensor, rows: list[int], token_ids: torch.Tensor,
             ks: list[int]) -> list[TokenLogprob]:
    """For each of ``rows``: the raw model distribution's log probability of its sampled
    token (``token_ids``, one per row of ``logits``) and its top ``ks[i]``."""
    if not rows:
        return []
    device = logits.device
    idx = _put(rows, torch.long, device)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    chosen_ids = token_ids.index_select(0, idx)
    chosen = lp.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
    k = min(max(ks), lp.shape[1])
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], chosen_ids[:, None][:, :0])
    chosen_l, ids_l = chosen.tolist(), chosen_ids.tolist()
    top_vl, top_il = top_v.tolist(), top_i.tolist()
    return [TokenLogprob(ids_l[j], chosen_l[j],
                         list(zip(top_il[j][: ks[j]], top_vl[j][: ks[j]], strict=True)))
            for j in range(len(rows))]
