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

import math
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
# A batch of at most this many scores is biased, penalised and argmaxed whole (fewer ops);
# a larger one works on each kind's rows only (no copy or pass over rows that need none)
WHOLE_BATCH = 1 << 18
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
    then output; the penalties read them; an int64 array is read without a copy) and its
    uniform for this draw."""

    params: RowParams
    token_ids: Sequence[int] | np.ndarray = ()
    num_prompt: int = 0
    uniform: float = 0.5


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.long: np.int64,
          torch.bool: np.bool_}


def _put(data: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data on ``device``. On CUDA through pinned memory and without blocking: a copy
    from pageable memory would wait for the forward still running on the stream."""
    if isinstance(data, torch.Tensor):
        host = data
    elif dtype in _NUMPY:  # through numpy: torch.tensor() of a list costs 2-4x more
        host = torch.from_numpy(np.array(data, dtype=_NUMPY[dtype]))
    else:
        host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _processed(rows: Sequence[SampleRow]) -> bool:
    return any(r.params.logit_bias or (r.params.penalised and len(r.token_ids) > 0) for r in rows)


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
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and len(r.token_ids) > 0]
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
    pen = sorted({*rep, *freq})
    if not pen:
        return
    # every penalised row in one gather and one scatter; a row without one of the two
    # penalties is left as it is by it (no token seen, or penalties of 0)
    idx = _put(pen, torch.long, device)
    sub = _rows(scores, pen, idx)
    if rep:
        ids = set(rep)
        seen = _occurrences([rows[i].token_ids if i in ids else () for i in pen], vocab) > 0
        p = _put([rows[i].params.repetition_penalty for i in pen], scores.dtype, device)[:, None]
        seen_t = _put(torch.from_numpy(seen), torch.bool, device)
        sub = torch.where(seen_t, torch.where(sub > 0, sub / p, sub * p), sub)
    if freq:
        ids = set(freq)
        counts = _occurrences([rows[i].token_ids[rows[i].num_prompt:] if i in ids else ()
                               for i in pen], vocab).astype(np.float32)
        fp = _put([[rows[i].params.frequency_penalty, rows[i].params.presence_penalty]
                   for i in pen], scores.dtype, device)
        c = _put(torch.from_numpy(counts), scores.dtype, device)
        sub = sub - fp[:, :1] * c - fp[:, 1:] * (c > 0).to(scores.dtype)
    scores.index_copy_(0, idx, sub)


def _occurrences(histories: list[Sequence[int] | np.ndarray], vocab: int) -> np.ndarray:
    """``[len(histories), vocab]`` int64: how often each id occurs in each history (one
    ``bincount`` over the histories laid end to end, each offset by its row's start)."""
    arrays = [np.asarray(h, dtype=np.int64) for h in histories]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if flat.size and not 0 <= int(flat.min()) <= int(flat.max()) < vocab:
        raise ValueError(f"a token id outside [0, {vocab}) in a penalised history")
    flat += np.repeat(np.arange(len(arrays), dtype=np.int64) * vocab, [len(a) for a in arrays])
    counts: np.ndarray = np.bincount(flat, minlength=len(arrays) * vocab)
    return counts.reshape(len(arrays), vocab)


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """The next token of every row, ``[batch]`` int64 on the logits' device.
    ``logits``: ``[batch, vocab]``, any float dtype; it is not modified."""
    device = logits.device
    vocab = logits.shape[1]
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    ids: torch.Tensor | None = None
    if len(rows) * vocab <= WHOLE_BATCH:
        # bias and penalties of every row at once, one argmax for every row (the drawn
        # rows' ids are written over theirs): fewer ops than selecting each kind's rows
        scores = process(logits, rows)
        if len(drawn) < len(rows):
            ids = scores.argmax(dim=-1)
            if not drawn:
                return ids
        # the drawn rows, in fp32, owned: everything below works on them in place
        sub = _rows(scores, drawn)
        sub = sub.to(torch.float32, copy=sub.data_ptr() == logits.data_ptr())
    else:  # a wide vocabulary: each kind works on its own rows only
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            best = _rows(logits, greedy)
            picked = [rows[i] for i in greedy]
            if _processed(picked):
                best = best.to(torch.float32, copy=best.data_ptr() == logits.data_ptr())
                _process_(best, picked)
            if not drawn:
                return best.argmax(dim=-1)
            ids = torch.empty(len(rows), dtype=torch.long, device=device)
            ids.index_copy_(0, _put(greedy, torch.long, device), best.argmax(dim=-1))
        sub = _rows(logits, drawn)
        sub = sub.to(torch.float32, copy=sub.data_ptr() == logits.data_ptr())
        _process_(sub, [rows[i] for i in drawn])
    # per row, one copy: temperature, log(min_p) (-inf: off), top_k (vocab: off), the
    # top_p limit (2: off, more than any share of the total), uniform
    table = _put([[r.params.temperature,
                   math.log(r.params.min_p) if r.params.min_p > 0 else -math.inf,
                   r.params.top_k if 0 < r.params.top_k < vocab else vocab,
                   r.params.top_p if r.params.top_p < 1.0 else 2.0, r.uniform]
                  for r in (rows[i] for i in drawn)], torch.float32, device)
    # Shift so the largest score is 0 before scaling: a small temperature cannot overflow,
    # and every weight (exp) below is at most 1, a row's total at least 1.
    sub.sub_(sub.amax(dim=-1, keepdim=True)).div_(table[:, :1])
    min_p = any(rows[i].params.min_p > 0 for i in drawn)
    filtered = [j for j, i in enumerate(drawn)
                if 0 < rows[i].params.top_k < vocab or rows[i].params.top_p < 1.0]
    # Every filter is a cut by value: a row keeps the tokens scoring at least its cut.
    # min_p: p < min_p * p_max  <=>  score < log(min_p) (the top score is 0 after the shift)
    cut = table[:, 1:2] if min_p else None
    wide: list[int] = []
    if filtered:
        params = [rows[drawn[j]].params for j in filtered]
        max_k = max(p.top_k if 0 < p.top_k < vocab else 0 for p in params)
        width = min(vocab, max(CANDIDATES, max_k))
        if width * 4 >= vocab:  # a sort beats a topk this wide: sort every drawn row, the
            # unfiltered ones too (their cut keeps all), rather than select and scatter
            filtered = list(range(len(drawn)))
            width = vocab
        open_rows = [n for n, p in enumerate(params)  # top_p without top_k: its nucleus
                     if p.top_p < 1.0 and not 0 < p.top_k < vocab]  # may pass the candidates
        kept, wide = _cuts(sub, table, filtered, width, open_rows if width < vocab else [],
                           min_p)
        cut = kept if cut is None else torch.maximum(kept, cut)
    picks = _inverse_cdf(sub, table[:, 4], cut)
    if wide:  # their nucleus is wider than their candidates: the exact rule on the whole row
        _sample_sorted(sub, table, wide, picks)
    if ids is None:
        return picks
    return ids.index_copy_(0, _put(drawn, torch.long, device), picks)


def _rows(t: torch.Tensor, rows: list[int], index: torch.Tensor | None = None) -> torch.Tensor:
    """Those rows of ``t``: ``t`` itself when they are all of it, else a copy."""
    if len(rows) == t.shape[0]:
        return t
    return t.index_select(0, _put(rows, torch.long, t.device) if index is None else index)


def _inverse_cdf(scores: torch.Tensor, u: torch.Tensor,
                 cut: torch.Tensor | None = None) -> torch.Tensor:
    """Column of each row's draw among its tokens scoring at least its ``cut`` (``[rows,
    1]``; None: all), in token-id order: the first whose cumulative weight reaches ``u``
    of the kept tokens' total. ``u`` in (0, 1): a token of weight 0 is never taken. The
    cut is a product with the kept mask, not a masked_fill of the scores: on a CPU that
    costs a third as much over a wide vocabulary, and softmax's exp is faster than exp's."""
    weights = torch.softmax(scores, dim=-1)
    if cut is not None:
        weights.mul_(scores >= cut)
    cdf = weights.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    col = torch.searchsorted(cdf, target, right=False).squeeze(1)
    return col.clamp_(max=scores.shape[1] - 1)


def _cuts(sub: torch.Tensor, table: torch.Tensor, which: list[int], width: int,
          open_rows: list[int], min_p: bool) -> tuple[torch.Tensor, list[int]]:
    """Each row's smallest kept score after min_p, top_k and top_p (``[rows, 1]``; -inf
    for a row of ``sub`` not in ``which``), found on its ``width`` best scores, and the
    rows of ``which`` listed in ``open_rows`` whose nucleus lies beyond those candidates.
    ``min_p``: whether any row has one (its log is ``table``'s column 1).

    The cut is a value, not a position: a draw of every token scoring at least it, in
    token-id order, does not depend on how ties were ordered by a ``sort`` or ``topk`` of a
    width the rest of the batch chose, and ties with the last kept token stay, as a plain
    ``top_k`` keeps them: a seeded request gets the same tokens whatever shares its batch,
    bf16 logits' many ties included. Sums are ``cumsum``'s, which adds in order: a
    candidate row's total does not depend on how many zeros follow it either."""
    cut, short = _row_cuts(_rows(sub, which), _rows(table, which), width, bool(open_rows),
                           min_p)
    wide = [which[n] for n in open_rows if short[n]]
    if len(which) == sub.shape[0]:
        return cut, wide
    every = torch.full((sub.shape[0], 1), float("-inf"), device=sub.device)
    return every.index_copy_(0, _put(which, torch.long, sub.device), cut), wide


def _row_cuts(scores: torch.Tensor, params: torch.Tensor, width: int, whole_total: bool,
              min_p: bool) -> tuple[torch.Tensor, list[bool]]:
    """``_cuts`` of these rows (``params``: their rows of the table). ``whole_total``:
    some rows have no top_k while ``width`` is under the vocabulary; they share out their
    whole row, not their candidates, and whether each one's candidates fall short of its
    top_p comes back (one sync: the ids come back to the host right after anyway)."""
    vocab = scores.shape[1]
    vals = _sorted_best_first(scores) if width == vocab else scores.topk(width, dim=-1).values
    # every token as good as the k-th stays (a row without top_k: its last, all of them),
    # and, under min_p, as good as log(min_p): two cuts by value, the higher one holds
    floor = vals.gather(1, params[:, 2:3].clamp(max=width).long() - 1)
    if min_p:
        floor = torch.maximum(floor, params[:, 1:2])
    above = vals >= floor
    weights = vals.exp().mul_(above)
    cum = weights.cumsum(dim=-1)
    total = cum[:, -1:]
    short: list[bool] = []
    if whole_total:  # min_p's survivors of the whole row
        whole = scores.exp()
        if min_p:
            whole.mul_(scores >= params[:, 1:2])
        total = torch.where(params[:, 2:3] >= vocab, whole.sum(dim=-1, keepdim=True), total)
        short = (cum[:, -1:] < params[:, 3:4] * total).flatten().tolist()
    # drop a token once the tokens before it already cover top_p; the top one never is
    # (a top_p that is 0 in fp32 keeps it too)
    kept = (above & ((cum - weights) < params[:, 3:4] * total)).sum(dim=-1, keepdim=True)
    return vals.gather(1, kept.clamp_(min=1) - 1), short


def _sample_sorted(sub: torch.Tensor, table: torch.Tensor, rows: list[int],
                   picks: torch.Tensor) -> None:
    """min_p and top_p over the whole sorted row: the exact rule for a nucleus of any
    width."""
    scores = _rows(sub, rows)
    params = _rows(table, rows)
    cut, _ = _row_cuts(scores, params, scores.shape[1], False, True)
    picks.index_copy_(0, _put(rows, torch.long, sub.device), _inverse_cdf(scores, params[:, 4], cut))


def _sorted_best_first(scores: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first. A CPU fp32 batch is sorted by numpy: torch's CPU
    sort costs ~10x more on the small rows a step has (32 x 263: 240 vs 21 µs); the values
    are the same either way."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        return torch.from_numpy(-np.sort(-scores.numpy(), axis=-1))
    return torch.sort(scores, dim=-1, descending=True).values


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
