"""The step's host side: batched sampling, the draw stream, vectorised step inputs, and the
CUDA-graph decode path (run where a GPU is present, skipped with a reason elsewhere)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from kvgate.cachestore import CacheSeq
from kvgate.gateway.engine import GenerateRequest, SamplingParams
from kvgate.gateway.engine import sampler as sampler_module
from kvgate.gateway.engine.demo import build_tokenizer
from kvgate.gateway.engine.runner import ModelRunner
from kvgate.gateway.engine.sampler import SampleRow, logprobs, sample, uniforms
from kvgate.gateway.engine.scheduler import Chunk
from kvgate.gateway.engine.sequence import PageRow, Sequence
from kvgate.kernels import KVLayout

from .conftest import collect, greedy, prompt_of

MIXES = [
    dict(temperature=0.0),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_k=40, min_p=0.1),
    dict(temperature=0.9, presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3),
    dict(temperature=0.0, logit_bias={3: 5.0, 17: -100.0}, repetition_penalty=0.8),
    dict(temperature=1.0, min_p=0.3),
    dict(temperature=0.5, top_p=0.5, top_k=8, logit_bias={9: 2.0}),
]


def _rows(vocab: int, batch: int, seed: int) -> list[SampleRow]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        history = torch.randint(0, vocab, (12,), generator=g).tolist()
        rows.append(SampleRow(SamplingParams(**MIXES[i % len(MIXES)]), history, 7,
                              float(uniforms([seed], [i])[0])))
    return rows


@pytest.mark.parametrize("vocab", [50, 3000])
def test_a_batch_samples_each_row_as_it_would_alone(vocab: int) -> None:
    """One batched pass gives every row the token it gets alone: its own parameters, its
    own draw, nothing of its neighbours'."""
    g = torch.Generator().manual_seed(vocab)
    for seed in range(4):
        logits = torch.randn(24, vocab, generator=g) * 3
        rows = _rows(vocab, 24, seed)
        together = sample(logits, rows).tolist()
        alone = [int(sample(logits[i : i + 1], [rows[i]])[0]) for i in range(24)]
        assert together == alone
        # and in another company, in another order
        order = list(reversed(range(0, 24, 3)))
        assert sample(logits[order], [rows[i] for i in order]).tolist() == [together[i] for i in order]


def test_the_logits_are_left_as_they_were() -> None:
    logits = torch.randn(8, 64)
    before = logits.clone()
    sample(logits, _rows(64, 8, 1))
    assert torch.equal(logits, before)


def test_filtered_rows_never_leave_their_kept_set() -> None:
    """top_k / top_p / min_p against the rule computed plainly on the sorted row."""
    vocab = 200
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, vocab, generator=g) * 2
    for params in (SamplingParams(top_k=3), SamplingParams(top_p=0.3),
                   SamplingParams(min_p=0.2), SamplingParams(top_k=10, top_p=0.5)):
        probs = torch.softmax(logits[0], -1)
        order = torch.argsort(probs, descending=True)
        keep = set(order[: params.top_k or vocab].tolist())
        if params.top_p < 1:
            p = probs[order[: params.top_k or vocab]]
            p = p / p.sum()
            before = torch.cumsum(p, 0) - p
            keep &= set(order[: int((before < params.top_p).sum())].tolist())
        if params.min_p:
            keep &= set(torch.nonzero(probs >= params.min_p * probs.max()).flatten().tolist())
        draws = uniforms([5] * 400, range(400))
        picks = {int(sample(logits, [SampleRow(params, uniform=float(u))])[0]) for u in draws}
        assert picks <= keep
        assert len(picks) > 1 or len(keep) == 1


def test_a_nucleus_wider_than_the_candidates_falls_back_to_the_full_sort(monkeypatch) -> None:
    """A flat row's top_p nucleus spans more tokens than ``CANDIDATES``: the draw must be
    the one the whole sorted row gives."""
    vocab = 20000
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(2)) * 0.01
    rows = [SampleRow(SamplingParams(top_p=0.9), uniform=float(u))
            for u in uniforms([9] * 4, range(4))]
    sorted_rows: list[int] = []
    whole = sampler_module._sample_sorted

    def spy(sub, table, which, picks):  # type: ignore[no-untyped-def]
        sorted_rows.extend(which)
        whole(sub, table, which, picks)

    monkeypatch.setattr(sampler_module, "_sample_sorted", spy)
    narrow = sample(logits, rows).tolist()
    assert sorted_rows == [0, 1, 2, 3]
    monkeypatch.setattr(sampler_module, "CANDIDATES", vocab)  # every row sorted whole
    assert sample(logits, rows).tolist() == narrow


def test_the_draw_stream_is_keyed_by_seed_and_position() -> None:
    u = uniforms([7, 7, 8, 2**64 - 1, -3], [0, 1, 0, 5, 5])
    assert u.dtype == np.float32 and ((u > 0) & (u < 1)).all()
    assert u[0] != u[1] and u[0] != u[2]
    assert (uniforms([7], [1]) == u[1]).all()  # the same whatever else is drawn beside it
    many = uniforms([123] * 20000, range(20000))
    assert abs(float(many.mean()) - 0.5) < 0.01 and len(set(many.tolist())) > 19000


def test_logprobs_are_the_raw_distribution_of_each_row() -> None:
    logits = torch.randn(5, 30)
    ids = torch.tensor([3, 1, 4, 1, 5])
    got = logprobs(logits, [0, 2, 4], ids, [0, 2, 30])
    lp = torch.log_softmax(logits, -1)
    for out, row, k in zip(got, [0, 2, 4], [0, 2, 30], strict=True):
        assert out.token_id == int(ids[row])
        assert abs(out.logprob - float(lp[row, ids[row]])) < 1e-5
        assert [t for t, _ in out.top] == torch.topk(lp[row], k).indices.tolist()


def test_a_page_row_appends_and_restarts_with_a_new_table() -> None:
    row = PageRow()
    table = [4, 9]
    assert row.sync(table).tolist() == [4, 9]
    table.extend(range(10, 40))  # grows past the array's first capacity
    assert row.sync(table).tolist() == [4, 9, *range(10, 40)]
    fresh = [1, 2, 3]  # a preempted sequence readmitted: a new handle, a new list
    assert row.sync(fresh).tolist() == [1, 2, 3]
    fresh[-1] = 77  # a page replaced in place is caught
    assert row.sync(fresh).tolist() == [1, 2, 77]


def test_step_inputs_match_a_plain_per_token_construction(demo_loaded) -> None:
    """Positions, slot mappings, block tables and sample rows built with array ops equal
    the per-token loop they replace, for a mix of decodes and prefill chunks."""
    bs = 4
    pool = torch.zeros(64, 1)
    runner = ModelRunner(demo_loaded.model, pool, KVLayout(1, 1, 1, bs, torch.float32))
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    chunks = []
    for i, (n, start, length) in enumerate([(9, 8, 1), (13, 0, 5), (30, 17, 13), (6, 5, 1),
                                            (21, 3, 9)]):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        seq = Sequence(GenerateRequest(f"r{i}", "ns", ids, SamplingParams()), tok)
        pages = torch.randperm(64, generator=g)[: -(-n // bs)].tolist()
        seq.handle = CacheSeq(f"r{i}", "ns", block_table=pages)
        chunks.append(Chunk(seq, start, length))
    inputs = runner.prepare(chunks)
    ids, pos, slots, rows, tables = [], [], [], [], []
    for c in chunks:
        table = c.seq.handle.block_table
        for p in range(c.start, c.start + c.length):
            ids.append(c.seq.token_ids[p])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        if c.samples:
            rows.append(len(ids) - 1)
        tables.append(table[: -(-(c.start + c.length) // bs)])
    assert inputs.ids.tolist() == ids and inputs.positions.tolist() == pos
    assert inputs.ctx.slot_mapping.tolist() == slots
    assert inputs.sample_rows.tolist() == rows
    width = max(map(len, tables))
    assert inputs.ctx.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
    assert inputs.ctx.seq_lens.tolist() == [c.start + c.length for c in chunks]
    assert inputs.ctx.cu_seqlens_q.tolist() == [0, *np.cumsum([c.length for c in chunks])]
    assert not inputs.ctx.is_decode and not inputs.ctx.is_fresh
    assert inputs.ctx.max_seq_len == 30


async def test_a_logits_row_shared_by_forked_choices_samples_each_with_its_seed(make_engine):
    """n > 1: the choices sample from one row in one batch; each equals its single run."""
    engine = await make_engine()
    prompt = prompt_of(engine, "fork me")
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=40, n=2, ignore_eos=True,
                            logprobs=1)
    got: dict[int, list[int]] = {}
    async for ev in engine.generate(GenerateRequest("f", "tenant:f", prompt, params)):
        for t in getattr(ev, "token_ids", []):
            got.setdefault(ev.index, []).append(t)
    for i in range(2):
        single = SamplingParams(max_tokens=4, temperature=1.0, seed=40 + i, ignore_eos=True)
        ids, _, _ = await collect(engine, GenerateRequest(f"s{i}", f"tenant:s{i}", prompt, single))
        assert got[i] == ids


cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="CUDA graphs need a CUDA device; none is visible here")


@cuda
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8", "int8"])
async def test_graph_decode_equals_eager_decode(make_engine, kv_dtype):
    """The captured decode step gives the eager step's greedy tokens, batch padding and
    all, and captures only the padded sizes it met; on quantized pages too (the store
    grows scales without a host sync)."""
    pytest.importorskip("triton", reason="the graph path runs the Triton kernels")
    prompts = [f"graph {i}: " + "abc" * i for i in range(5)]
    outputs = {}
    for graphs in (False, True):
        engine = await make_engine(device="cuda", cuda_graphs=graphs, kv_dtype=kv_dtype)
        reqs = [GenerateRequest(f"g{graphs}{i}", "tenant:g", prompt_of(engine, p), greedy(12))
                for i, p in enumerate(prompts)]
        outputs[graphs] = [r[0] for r in await asyncio.gather(*(collect(engine, r) for r in reqs))]
        if graphs:
            assert engine.runner.graphs is not None and engine.runner.graphs.graphs
        else:
            assert engine.runner.graphs is None
    assert outputs[True] == outputs[False]


def test_a_bias_outside_the_vocabulary_is_refused_on_the_host() -> None:
    """Never an index on the device (a CUDA assert would end the process): a ValueError,
    which fails that row alone in the engine."""
    with pytest.raises(ValueError, match="logit_bias"):
        sample(torch.zeros(2, 10), [SampleRow(SamplingParams()),
                                    SampleRow(SamplingParams(logit_bias={10: 1.0}))])


def test_a_history_outside_the_vocabulary_is_refused_on_the_host() -> None:
    """Penalties count ids on the host: an id past the vocabulary would land in the next
    row's counts, a negative one anywhere. A ValueError instead."""
    penalised = SamplingParams(temperature=1.0, repetition_penalty=1.2)
    for history in ([1, 2, 10], [-1, 3]):
        with pytest.raises(ValueError, match="outside"):
            sample(torch.zeros(2, 10), [SampleRow(SamplingParams()),
                                        SampleRow(penalised, history, 1)])


def test_a_sequences_history_array_follows_its_ids() -> None:
    """``Sequence.history()`` copies only what was appended since its last call; the
    sampler reads it as it reads the list: the same penalised draws."""
    seq = Sequence(GenerateRequest("r", "ns", [5, 6, 7], SamplingParams()), build_tokenizer())
    rng = np.random.default_rng(0)
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.8, repetition_penalty=1.5, presence_penalty=1.0,
                            frequency_penalty=0.7, seed=1)
    for step in range(300):
        seq.token_ids.append(int(rng.integers(0, 64)))
        if step % 7:
            continue
        history = seq.history()
        assert history.dtype == np.int64 and history.tolist() == seq.token_ids
        u = float(uniforms([1], [step])[0])
        from_array = sample(logits, [SampleRow(params, history, 3, u)]).tolist()
        assert from_array == sample(logits, [SampleRow(params, list(seq.token_ids), 3, u)]).tolist()


async def test_a_row_whose_sampling_fails_fails_alone(make_engine):
    """A request whose parameters break the batched pass (a bias past the vocabulary that
    slipped past the HTTP checks) fails; the others sharing its steps finish."""
    engine = await make_engine()
    prompt = prompt_of(engine, "one bad apple")
    bad = SamplingParams(max_tokens=4, logit_bias={engine.vocab_size + 5: 1.0})
    results = await asyncio.gather(
        collect(engine, GenerateRequest("ok1", "tenant:a", prompt, greedy(6))),
        collect(engine, GenerateRequest("bad", "tenant:a", prompt, bad)),
        collect(engine, GenerateRequest("ok2", "tenant:a", prompt, greedy(6))),
        return_exceptions=True)
    assert isinstance(results[1], Exception)
    assert results[0][0] == results[2][0] and len(results[0][0]) == 6


@cuda
async def test_a_forward_that_cannot_be_captured_runs_eager(make_engine, monkeypatch):
    """A capture failure turns graphs off (logged) and the step runs eager: no request
    fails for it."""
    pytest.importorskip("triton", reason="the graph path runs the Triton kernels")
    engine = await make_engine(device="cuda", cuda_graphs=True)
    graphs = engine.runner.graphs
    assert graphs is not None

    def uncapturable(size: int) -> torch.Tensor:
        raise RuntimeError("a host sync inside the forward")

    monkeypatch.setattr(graphs, "_forward", uncapturable)
    prompt = prompt_of(engine, "no graph for me")
    ids, _, finish = await collect(engine, GenerateRequest("e", "tenant:e", prompt, greedy(6)))
    assert len(ids) == 6 and finish.finish_reason == "length"
    assert not graphs.enabled and not graphs.graphs
