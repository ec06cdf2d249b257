"""``kvgate plan`` predicts how many 2k-token sequences the engine runs at once.

The demo engine gets a device tier the planner says holds ten such sequences (and some
pages over), more 2k-token requests than that arrive together, and the most sequences
the scheduler ever has running is counted after every step: it is the planner's figure
(the issue's bar is within 5 %; the rule is the engine's own, so it is exact)."""

from __future__ import annotations

import asyncio
from typing import Any

from kvgate.gateway.cli import build_parser
from kvgate.gateway.engine import EngineConfig, GenerateRequest
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import LoadedModel
from kvgate.gateway.plan.cli import build

from .conftest import collect, greedy

PAGE = 4 * 2 * 16 * 2 * 64 * 4  # one demo page in bytes (fp32: what the engine uses on CPU)
SEQ_LEN = 2048
MAX_TOKENS = 8
REQUESTS = 14


def planned(device_bytes: int) -> dict[str, Any]:
    args = build_parser().parse_args([
        "plan", "--model", "demo", "--dtype", "float32", "--kv-dtype", "auto",
        "--device-cache-bytes", str(device_bytes), "--host-cache-bytes", "0",
        "--seq-len", str(SEQ_LEN), "--max-running", "64"])
    (fp32,) = build(args)["kv_dtypes"]
    assert fp32["kv_dtype"] == "fp32" and fp32["page_bytes"] == PAGE
    (at_2k,) = fp32["max_concurrent"]
    return at_2k


def test_the_planner_predicts_the_2k_sequences_the_engine_runs_at_once(
        demo_loaded: LoadedModel) -> None:
    device_bytes = (10 * 128 + 50) * PAGE
    plan = planned(device_bytes)
    assert plan["limited_by"] == "pages" and plan["pages_per_sequence"] == 128
    predicted = plan["sequences"]
    assert predicted == 10

    prompt_len = SEQ_LEN - MAX_TOKENS  # prompt + output = 2048 tokens
    prompts = [[(31 * i + 7 * j) % 250 + 3 for j in range(prompt_len)]
               for i in range(REQUESTS)]  # no two share a block: nothing is shared
    config = EngineConfig(device_cache_bytes=device_bytes, host_cache_bytes=0,
                          max_batch_tokens=REQUESTS * SEQ_LEN, max_running=64)

    async def run() -> tuple[int, list[Any]]:
        engine = Engine(config, loaded=demo_loaded)
        scheduler = engine.scheduler
        schedule = scheduler.schedule
        peak = [0]

        def counted() -> Any:
            out = schedule()
            peak[0] = max(peak[0], len(scheduler.running))
            return out

        scheduler.schedule = counted  # type: ignore[method-assign]
        await engine.start()
        try:
            results = await asyncio.gather(*(
                collect(engine, GenerateRequest(f"r{i}", "tenant:plan", p, greedy(MAX_TOKENS)))
                for i, p in enumerate(prompts)))
        finally:
            await engine.stop()
        return peak[0], results

    peak, results = asyncio.run(run())
    assert all(fin.finish_reason == "length" and len(ids) == MAX_TOKENS
               for ids, _, fin in results)
    assert peak < REQUESTS  # the pages, not the number of requests, bound it
    assert abs(peak - predicted) <= 0.05 * predicted, (peak, predicted)
