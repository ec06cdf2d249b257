"""Whatever the pool size, step budget and arrival mix, greedy output is the oracle's and
no page stays referenced afterwards: scheduling changes when tokens are computed, never
which tokens come out."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgate.gateway.engine import EngineConfig, GenerateRequest
from kvgate.gateway.engine.engine import Engine

from .conftest import collect, greedy

PAGE = 4 * 2 * 16 * 2 * 64 * 4  # one demo page in bytes
BASE = list(b"A shared system prompt that several requests start with. ")

# (shares the base prompt, prompt length, max tokens, tenant, priority)
workload = st.lists(
    st.tuples(st.booleans(), st.integers(min_value=1, max_value=40), st.integers(1, 6),
              st.sampled_from(["a", "b", "c"]), st.integers(-1, 1)),
    min_size=1, max_size=6,
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=workload,
    pages=st.integers(min_value=10, max_value=40),
    budget=st.sampled_from([8, 24, 64, 512]),
    running=st.sampled_from([1, 2, 64]),
    fair=st.booleans(),
)
def test_any_schedule_gives_the_oracle_output(demo_loaded, oracle, requests, pages, budget,
                                              running, fair):
    """Tenants, priorities, fair preemptions and a small running cap included."""
    prompts = []
    for i, (shared, n, *_) in enumerate(requests):
        head = BASE if shared else []
        prompts.append(head + [(7 * i + j) % 200 + 32 for j in range(n)])

    async def run() -> list:
        config = EngineConfig(device_cache_bytes=pages * PAGE, host_cache_bytes=8 * PAGE,
                              max_batch_tokens=budget, max_running=running,
                              fair_scheduling=fair)
        engine = Engine(config, loaded=demo_loaded)
        await engine.start()
        try:
            results = await asyncio.gather(*(
                collect(engine, GenerateRequest(f"r{i}", "tenant:p", p, greedy(m), tenant=t,
                                                priority=prio))
                for i, (p, (_, _, m, t, prio)) in enumerate(zip(prompts, requests, strict=True))
            ))
            stats = engine.cache_stats().as_dict()
        finally:
            await engine.stop()
        assert stats["blocks"]["active"] == 0
        return results

    for p, (_, _, m, *_), (ids, _, fin) in zip(prompts, requests, asyncio.run(run()),
                                               strict=True):
        assert fin.finish_reason == "length"
        assert ids == oracle(p, m)
