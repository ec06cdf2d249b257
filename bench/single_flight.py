"""One prefill per prefix: 16 concurrent requests sharing a 4k-token prefix.

Sixteen requests of one namespace arrive at once (``max_running`` lets all of them run
together) with the same prefix, each with a suffix of its own (``suffixes``) or all with
the very same prompt (``identical``). Single-flight on (the default
``single_flight_wait_steps``), the first admitted computes the prefix and the others wait
for its blocks; off (``single_flight_wait_steps=0``, the plain baseline), every request
admitted before the prefix is committed computes it again. Step budgets: the server's
default (2048 tokens: the prompt takes three chunks, and requests admitted with the last
one overlap it) and 8192 (the whole prompt in one step: all sixteen are admitted together).

Per row: prompt tokens computed (counted at the model runner) over one prefix's tokens
(goal with single-flight ≤ 1.25), and the median time to first token of the sixteen over
a lone request's (the same prompt length, cold, alone on the engine; goal ≤ 1.5). Times are
medians over ``--reps`` rounds, each round in a fresh namespace so nothing is cached.

Writes ``bench/results/single_flight.json`` (``single_flight-<gpu>.json`` on CUDA).
Run: ``python -m bench.single_flight [--shape demo|bench] [--prefix 4000] [--reps 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
from typing import Any

import torch

from bench.common import print_table, smoke, write_result
from bench.ttft import ttft
from kvgate.gateway.engine import EngineConfig
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import LoadedModel, load_model
from kvgate.gateway.engine.scheduler import Chunk

SUFFIX = 32
WAIT_STEPS = EngineConfig().single_flight_wait_steps


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=g).tolist()  # printable bytes


def count_prompt_tokens(engine: Engine) -> list[int]:
    """A one-item list the runner adds every computed prompt token to."""
    computed = [0]
    run = engine.runner.run

    def counting(chunks: list[Chunk]) -> Any:
        for c in chunks:
            computed[0] += max(0, min(c.start + c.length, c.seq.num_prompt_tokens) - c.start)
        return run(chunks)

    engine.runner.run = counting  # type: ignore[method-assign]
    return computed


async def measure(loaded: LoadedModel, shape: str, prefix_len: int, n: int, budget: int,
                  identical: bool, wait_steps: int, reps: int) -> dict[str, float]:
    cfg = loaded.model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    token_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # K and V
    # Room for every request's own copy of the prompt (what the baseline computes), and more.
    device_bytes = n * (prefix_len + SUFFIX + 16) * token_bytes * 5 // 4
    config = EngineConfig(model=shape, device_cache_bytes=device_bytes,
                          host_cache_bytes=device_bytes // 4, max_batch_tokens=budget,
                          max_running=max(16, n), single_flight_wait_steps=wait_steps,
                          max_model_len=prefix_len + SUFFIX + 16)
    engine = Engine(config, loaded=loaded)
    computed = count_prompt_tokens(engine)
    lone: list[float] = []
    p50: list[float] = []
    ratios: list[float] = []
    await engine.start()
    try:
        await ttft(engine, "warmup", "warmup", tokens(2, 64))  # first-call overheads
        for r in range(reps):
            prefix = tokens(1000 + r, prefix_len)
            suffixes = [tokens(5000 + 100 * r + i, SUFFIX) for i in range(n)]
            # A lone request: the same length, cold, nothing else running.
            t, _ = await ttft(engine, f"lone{r}", f"lone:{r}", prefix + suffixes[0])
            lone.append(t)
            before = computed[0]
            prompts = [prefix + (suffixes[0] if identical else suffixes[i]) for i in range(n)]
            results = await asyncio.gather(*(ttft(engine, f"r{r}.{i}", f"tenant:{r}", p)
                                             for i, p in enumerate(prompts)))
            ratios.append((computed[0] - before) / prefix_len)
            p50.append(statistics.median(t for t, _ in results))
            billed = sum(len(p) - cached for p, (_, cached) in zip(prompts, results, strict=True))
            assert billed == computed[0] - before, (billed, computed[0] - before)
        waits = engine.cache_stats().single_flight
    finally:
        await engine.stop()
    lone_ms = statistics.median(lone) * 1000
    p50_ms = statistics.median(p50) * 1000
    return {
        "computed/prefix": round(statistics.median(ratios), 3),
        "ttft_p50_ms": round(p50_ms, 1),
        "lone_ttft_ms": round(lone_ms, 1),
        "p50/lone": round(p50_ms / lone_ms, 3),
        "waited": waits.waited,
        "saved_tokens": waits.saved_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="demo", help="demo or bench (random weights)")
    parser.add_argument("--prefix", type=int, default=smoke(4000, 200),
                        help="shared prefix tokens (each request adds a 32-token suffix)")
    parser.add_argument("--requests", type=int, default=smoke(16, 3))
    parser.add_argument("--budgets", default=smoke("2048,8192", "128"),
                        help="step token budgets (max_batch_tokens)")
    parser.add_argument("--reps", type=int, default=smoke(2, 1))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"single-flight prefill: {args.requests} concurrent requests, {args.prefix}-token "
          f"prefix + {SUFFIX}, {args.shape} model, {device}, {torch.get_num_threads()} threads")
    loaded = load_model(EngineConfig(model=args.shape))
    rows: list[dict[str, Any]] = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for variant in ("suffixes", "identical"):
            for mode, wait_steps in (("on", WAIT_STEPS), ("off", 0)):
                row = asyncio.run(measure(loaded, args.shape, args.prefix, args.requests,
                                          budget, variant == "identical", wait_steps,
                                          args.reps))
                rows.append({"budget": budget, "prompts": variant, "single_flight": mode,
                             **row})
                print(f"  {rows[-1]}", flush=True)
    print_table(rows, "prompt tokens computed per prefix, and TTFT p50 of the requests over a "
                "lone request's; goals with single-flight on: computed/prefix <= 1.25, "
                "p50/lone <= 1.5")
    name = "single_flight" if device == "cpu" else "single_flight-" + re.sub(
        r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    write_result(name, {"shape": args.shape, "prefix_tokens": args.prefix,
                        "suffix_tokens": SUFFIX, "requests": args.requests,
                        "wait_steps": WAIT_STEPS, "rows": rows})


if __name__ == "__main__":
    main()
