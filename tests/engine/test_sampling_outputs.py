"""Part A of the agents issue: penalties, logit_bias, min_p, logprobs and n > 1 in the engine.

Each processor is checked against a plain torch computation of the same rule; the engine
tests run the demo model."""

from __future__ import annotations

import asyncio

import torch

from kvgate.gateway.engine import FinishEvent, GenerateRequest, SamplingParams, TokenEvent
from kvgate.gateway.engine.demo import build_model
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.sampler import SampleRow, logprobs, process

from .conftest import collect, greedy, pick, picks, prompt_of, wait_idle


def test_logit_bias_of_100_forces_a_token_and_minus_100_bans_one():
    logits = torch.tensor([5.0, 1.0, 0.0, -3.0])
    assert pick(logits, SamplingParams(temperature=0, logit_bias={3: 100.0})) == 3
    assert pick(logits, SamplingParams(temperature=0, logit_bias={0: -100.0})) == 1
    assert picks(logits, SamplingParams(temperature=1.0, logit_bias={2: 100.0}), 50) == {2}


def test_penalties_match_the_rules_computed_by_hand():
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    history = [1, 2, 0, 0, 3]  # prompt [1, 2], output [0, 0, 3]
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    want = logits - torch.tensor([0.5 * 2 + 0.25, 0.0, 0.0, 0.5 + 0.25])
    assert torch.allclose(process(logits[None], [SampleRow(p, history, 2)])[0], want)
    # argmax moves from 0 to 1 once the output repeats token 0
    assert pick(logits, SamplingParams(temperature=0), history, 2) == 0
    assert pick(logits, SamplingParams(temperature=0, frequency_penalty=0.1), history, 2) == 1
    # repetition: every token seen in prompt or output, positive divided, negative multiplied
    r = SamplingParams(repetition_penalty=2.0)
    got = process(logits[None], [SampleRow(r, [2, 3], 1)])[0]
    assert torch.allclose(got, torch.tensor([2.0, 1.9, -2.0, 0.25]))
    assert pick(logits, SamplingParams(temperature=0, repetition_penalty=1.2),
                [0], 1) == 1  # 2.0/1.2 < 1.9


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # min_p 0.5: kept p >= 0.25 → tokens 0 and 1
    assert picks(logits, SamplingParams(min_p=0.5), 300) == {0, 1}
    assert picks(logits, SamplingParams(min_p=0.2), 500) == {0, 1, 2}


def test_token_logprob_is_the_raw_log_softmax():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    lp = torch.log_softmax(logits, -1)
    (got,) = logprobs(logits[None], [0], torch.tensor([2]), [2])
    assert got.token_id == 2 and abs(got.logprob - float(lp[2])) < 1e-6
    assert [t for t, _ in got.top] == [1, 2]
    assert abs(got.top[0][1] - float(lp[1])) < 1e-6


async def _choices(engine: Engine, request: GenerateRequest) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    finishes = 0
    async for ev in engine.generate(request):
        if isinstance(ev, TokenEvent):
            out.setdefault(ev.index, []).extend(ev.token_ids)
        else:
            assert isinstance(ev, FinishEvent)
            finishes += 1
    assert finishes == request.sampling.n
    return out


async def test_logprobs_are_log_softmax_of_the_model_logits(make_engine, oracle):
    engine = await make_engine()
    prompt = prompt_of(engine, "log probabilities")
    req = GenerateRequest("lp", "tenant:a", prompt, greedy(5, logprobs=3), stream=False)
    logprobs = []
    ids: list[int] = []
    async for ev in engine.generate(req):
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
            logprobs += ev.logprobs or []
    assert ids == oracle(prompt, 5)
    model = build_model("demo", attn_implementation="sdpa")  # same seed, same weights
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    assert [lp.token_id for lp in logprobs] == ids
    for i, (lp, tok) in enumerate(zip(logprobs, ids, strict=True)):
        assert abs(lp.logprob - float(want[i, tok])) < 1e-3
        assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely
        assert len(lp.top) == 3


async def test_n_choices_share_one_prefill_and_equal_single_runs(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "three samples of one prompt, please: " + "x" * 30)
    assert len(prompt) % engine.config.block_size  # a partial last page, copied at the fork
    computed: list[int] = []
    run = engine.runner.run

    def counting(chunks):  # type: ignore[no-untyped-def]
        computed.append(sum(c.length for c in chunks))
        return run(chunks)

    engine.runner.run = counting  # type: ignore[method-assign]
    m = 6
    params = SamplingParams(max_tokens=m, temperature=1.0, seed=1234, n=3, ignore_eos=True)
    together = await _choices(engine, GenerateRequest("n3", "tenant:n", prompt, params))
    assert sorted(together) == [0, 1, 2]
    assert engine.scheduler.num_forks == 2
    # the prompt once, then each choice's tokens after its first (sampled from the shared row)
    assert sum(computed) == len(prompt) + 3 * (m - 1)
    stats = engine.cache_stats()
    assert stats.hit_tokens + stats.miss_tokens == len(prompt)  # the prompt counted once
    await wait_idle(engine)
    for i in range(3):  # a different namespace: cold, computed alone
        single = SamplingParams(max_tokens=m, temperature=1.0, seed=1234 + i, ignore_eos=True)
        ids, _, _ = await collect(engine, GenerateRequest(f"s{i}", f"tenant:s{i}", prompt, single))
        assert ids == together[i]


async def test_n_choices_without_streaming_and_cancel_before_fork(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "held")
    params = SamplingParams(max_tokens=4, temperature=0.0, n=2, ignore_eos=True, logprobs=0)
    got = await _choices(engine, GenerateRequest("h", "tenant:h", prompt, params, stream=False))
    assert got[0] == got[1] and len(got[0]) == 4  # greedy: equal choices
    engine.cancel("never")  # unknown ids are ignored
    await wait_idle(engine)


async def test_n_choices_cancelled_early_still_end_with_n_finishes(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "cancel me " * 20)
    params = SamplingParams(max_tokens=50, temperature=1.0, n=3, ignore_eos=True)
    finishes: list[FinishEvent] = []

    async def run() -> None:
        async for ev in engine.generate(GenerateRequest("c", "tenant:c", prompt, params)):
            if isinstance(ev, FinishEvent):
                finishes.append(ev)
            elif len(finishes) == 0:
                engine.cancel("c")  # after the first token: every choice stops

    await asyncio.wait_for(run(), timeout=60)
    assert sorted(f.index for f in finishes) == [0, 1, 2]
    assert all(f.finish_reason == "cancelled" for f in finishes)
    gen = engine.generate(GenerateRequest("c2", "tenant:c", prompt, params))
    # right behind its Add in the inbox: usually before its prompt runs, when choices 1
    # and 2 do not exist yet and finish with choice 0
    asyncio.get_running_loop().call_soon(engine.cancel, "c2")
    got = await asyncio.wait_for(_finishes(gen), timeout=60)
    assert sorted(f.index for f in got) == [0, 1, 2]
    await wait_idle(engine)


async def _finishes(gen) -> list[FinishEvent]:  # type: ignore[no-untyped-def]
    return [ev async for ev in gen if isinstance(ev, FinishEvent)]
