"""One request cannot break the others: bad token ids are refused before they are queued,
and a failure that belongs to one sequence of a batched step fails that sequence alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvgate.gateway.engine import EngineError, GenerateRequest, InvalidTokens, SequenceFailed
from kvgate.gateway.engine import engine as engine_module
from kvgate.gateway.engine import request as request_module
from kvgate.gateway.engine.commands import Call

from .conftest import assert_store_consistent, collect, greedy, wait_idle

PROMPTS = [list(b"the first tenant asks about caches"), list(b"a second, longer question " * 2),
           list(b"third"), list(b"and a fourth one, with its own words")]
MAX_TOKENS = 6


@pytest.mark.parametrize("position", [0, 5])
@pytest.mark.parametrize("bad", [-1, "vocab", 2**32, 2**64, 1.5, True])
async def test_check_refuses_token_ids_the_model_does_not_have(make_engine, bad, position):
    engine = await make_engine()
    token = engine.vocab_size if bad == "vocab" else bad
    prompt = [65] * 8
    prompt[position] = token
    with pytest.raises(InvalidTokens, match=f"prompt token {position} is {token!r}") as err:
        engine.check(GenerateRequest("r", "tenant:a", prompt, greedy(2)))
    assert isinstance(err.value, EngineError)
    assert (err.value.position, err.value.token_id) == (position, token)
    with pytest.raises(InvalidTokens):  # generate checks too, before queueing anything
        await collect(engine, GenerateRequest("r", "tenant:a", prompt, greedy(2)))
    engine.check(GenerateRequest("ok", "tenant:a", [0, engine.vocab_size - 1], greedy(2)))


async def _run_batched(engine, requests: list[GenerateRequest]) -> tuple[list, list[int]]:
    """All requests reach the engine thread before its next step, so they share it."""
    batches: list[int] = []
    run = engine.runner.run

    def counting_run(chunks):
        batches.append(len(chunks))
        return run(chunks)

    engine.runner.run = counting_run
    gate = threading.Event()
    engine._inbox.put(Call(gate.wait))  # holds the engine thread while the requests queue up
    tasks = [asyncio.create_task(collect(engine, r)) for r in requests]
    while engine.queue_depth() < len(requests):
        await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return results, batches


async def _assert_others_finish(engine, oracle, results, bad: int) -> SequenceFailed:
    for i, (prompt, result) in enumerate(zip(PROMPTS, results, strict=True)):
        if i == bad:
            continue
        assert not isinstance(result, BaseException), result
        ids, _, fin = result
        assert fin.finish_reason == "length"
        assert ids == oracle(prompt, MAX_TOKENS)
    failed = results[bad]
    assert isinstance(failed, SequenceFailed), failed
    await wait_idle(engine)
    assert_store_consistent(engine.store)
    # and the engine keeps serving
    ids, _, fin = await collect(engine, GenerateRequest("after", "tenant:a", PROMPTS[0],
                                                        greedy(MAX_TOKENS)))
    assert ids == oracle(PROMPTS[0], MAX_TOKENS)
    return failed


def _requests(bad: int, bad_prompt: list[int]) -> list[GenerateRequest]:
    return [GenerateRequest(f"r{i}", f"tenant:{i}", bad_prompt if i == bad else p, greedy(MAX_TOKENS))
            for i, p in enumerate(PROMPTS)]


async def test_a_token_the_forward_cannot_embed_fails_only_its_sequence(make_engine, oracle,
                                                                        monkeypatch):
    engine = await make_engine()
    monkeypatch.setattr(request_module, "check_token_ids", lambda ids, vocab: None)  # a gap in check
    bad_prompt = [*PROMPTS[1][:-1], engine.vocab_size]  # fails the batched forward itself
    results, batches = await _run_batched(engine, _requests(1, bad_prompt))
    assert batches[0] == 4  # the four shared the failing step
    failed = await _assert_others_finish(engine, oracle, results, bad=1)
    assert isinstance(failed.__cause__, IndexError)
    assert failed.usage.prompt_tokens == len(bad_prompt) and failed.usage.completion_tokens == 0


async def test_a_token_the_cache_cannot_hash_fails_only_its_sequence(make_engine, oracle,
                                                                     monkeypatch):
    engine = await make_engine()
    monkeypatch.setattr(request_module, "check_token_ids", lambda ids, vocab: None)
    bad_prompt = [2**32, *PROMPTS[2]]  # the prefix match raises at admission
    results, _ = await _run_batched(engine, _requests(2, bad_prompt))
    failed = await _assert_others_finish(engine, oracle, results, bad=2)
    assert isinstance(failed.__cause__, OverflowError)
    assert failed.usage.completion_tokens == 0


async def test_a_failure_after_the_forward_fails_only_its_sequence(make_engine, oracle,
                                                                   monkeypatch):
    """Sampling, detokenizing and the stop check are the sequence's own: a failure there
    (here on the third token of one request) ends that request with its usage so far."""
    engine = await make_engine()
    real = engine_module.append_token

    def fragile(seq, token, eos, max_len, **kw):
        if seq.request_id == "r3" and seq.num_output == 2:
            raise UnicodeError("this sequence's detokenizer broke")
        return real(seq, token, eos, max_len, **kw)

    monkeypatch.setattr(engine_module, "append_token", fragile)
    results, batches = await _run_batched(engine, _requests(3, PROMPTS[3]))
    assert batches[0] == 4
    failed = await _assert_others_finish(engine, oracle, results, bad=3)
    assert isinstance(failed.__cause__, UnicodeError)
    assert failed.usage.prompt_tokens == len(PROMPTS[3])
    assert failed.usage.completion_tokens == 2
