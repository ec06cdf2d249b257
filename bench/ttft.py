"""Time to first token: cold, warm from the device tier, warm from the host tier, floor.

One run measures, for the real default model (``smollm2``, SmolLM2-135M-Instruct), the
demo model and the ~150M "bench" shape, a shared prefix (2048 tokens, and 8128 for
smollm2: its context is 8192) plus a 32-token suffix (a new suffix every time, so only the
prefix can hit):

- miss_ms: a namespace that has never seen the prefix (all 2080 tokens computed);
- hit_device_ms: the prefix cached in device pages;
- hit_host_ms: the prefix demoted to the host tier (promoted back on the hit);
- floor_ms: the 32-token suffix alone, no prefix at all;
- hf_prefill_ms: transformers' own forward (SDPA, no paging) over the same 2080 tokens.

The device pool is sized to one request (plus two pages), so one cold request from another
tenant pushes the warm prefix out to the host tier. Times are medians, seen from the
asyncio side (submit → first token event), through the real engine thread.

Goals on a CPU: speedup = miss / hit_device ≥ 15 on the demo model; hit_device ≤ 1.5 ×
floor; miss ≤ 1.2 × hf_prefill. Writes ``bench/results/ttft.json`` (``ttft-<gpu>.json`` on CUDA).

Run: ``python -m bench.ttft [--shapes smollm2,demo,bench] [--prefixes 2048,8128] [--reps 3]``
(a prefix longer than a model's context is skipped for that model).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time

import torch

from bench.common import print_table, smoke, write_result
from kvgate.gateway.engine import EngineConfig, GenerateRequest, SamplingParams, TokenEvent, gguf
from kvgate.gateway.engine.demo import SHAPES, build_model
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import load_model
from kvgate.kernels.layout import KVLayout

SUFFIX, BLOCK = 32, 16


def reference_model(shape: str) -> torch.nn.Module:
    """transformers' own model (SDPA attention, no paging) with the same weights."""
    if shape in SHAPES:
        return build_model(shape, attn_implementation="sdpa")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.resolve(shape, torch.float32),
                                                dtype=torch.float32, attn_implementation="sdpa")


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=g).tolist()  # printable bytes


async def ttft(engine: Engine, rid: str, namespace: str, prompt: list[int]) -> tuple[float, int]:
    """Seconds from submit to the first token event, and the cached tokens reported."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = None
    cached = -1
    async for ev in engine.generate(GenerateRequest(rid, namespace, prompt, params)):
        if isinstance(ev, TokenEvent) and first is None:
            first = time.perf_counter() - start
        elif not isinstance(ev, TokenEvent):
            cached = ev.usage.cached_tokens
    assert first is not None
    return first, cached


async def measure(shape: str, reps: int, prefix_len: int) -> dict[str, float]:
    PREFIX = prefix_len
    loaded = load_model(EngineConfig(model=shape))
    cfg = loaded.model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, BLOCK, torch.float32)
    pages = -(-(PREFIX + SUFFIX + 1) // BLOCK) + 2
    # The serving default: one eviction order over all tenants (no fair shares, which would
    # protect the one-off cold tenants' blocks and evict the warm prefix measured here).
    config = EngineConfig(
        model=shape, device_cache_bytes=pages * layout.page_bytes,
        host_cache_bytes=4 * pages * layout.page_bytes,
    )
    engine = Engine(config, loaded=loaded)
    hf = reference_model(shape)  # the plain path, same weights
    prefix = tokens(1, PREFIX)
    suffixes = iter([tokens(100 + i, SUFFIX) for i in range(3 * reps + 2)])
    times: dict[str, list[float]] = {k: [] for k in ("miss", "hit_device", "hit_host", "floor", "hf")}
    await engine.start()
    try:
        await ttft(engine, "warmup", "warmup", tokens(2, 64))  # first-call overheads
        with torch.inference_mode():
            hf(torch.tensor([tokens(2, 64)]), use_cache=False)
        await ttft(engine, "warm", "warm", prefix + next(suffixes))
        # Interleaved, so a machine shared with other work loads every figure alike.
        for i in range(reps):
            # A cold tenant: computes all 2080 tokens and, taking the whole device pool,
            # demotes the warm prefix to the host tier.
            t, cached = await ttft(engine, f"miss{i}", f"cold:{i}", tokens(1000 + i, PREFIX) + next(suffixes))
            assert cached == 0
            times["miss"].append(t)
            before = engine.cache_stats().as_dict()["promotions"]["count"]
            t, cached = await ttft(engine, f"hith{i}", "warm", prefix + next(suffixes))
            assert cached == PREFIX, cached
            assert engine.cache_stats().as_dict()["promotions"]["count"] - before >= PREFIX // BLOCK - 4
            times["hit_host"].append(t)
            t, cached = await ttft(engine, f"hitd{i}", "warm", prefix + next(suffixes))
            assert cached == PREFIX, cached
            times["hit_device"].append(t)
            t, _ = await ttft(engine, f"floor{i}", f"floor:{i}", tokens(2000 + i, SUFFIX))
            times["floor"].append(t)
            ids = torch.tensor([prefix + tokens(3000 + i, SUFFIX)])
            with torch.inference_mode():
                start = time.perf_counter()
                hf(ids, use_cache=False)
                times["hf"].append(time.perf_counter() - start)
    finally:
        await engine.stop()

    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    row = {
        "miss_ms": ms["miss"],
        "hit_device_ms": ms["hit_device"],
        "hit_host_ms": ms["hit_host"],
        "floor_ms": ms["floor"],
        "hf_prefill_ms": ms["hf"],
    }
    row["speedup"] = row["miss_ms"] / row["hit_device_ms"]
    return {k: round(v, 2) for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=smoke("smollm2,demo,bench", "demo"))
    parser.add_argument("--prefixes", default=smoke("2048,8128", "256"),
                        help="shared prefix lengths (tokens); 2048 for every shape, longer "
                             "ones for the real model only")
    parser.add_argument("--reps", type=int, default=smoke(3, 1))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prefixes = [int(p) for p in args.prefixes.split(",")]
    print(f"TTFT, prefixes {prefixes} + {SUFFIX}-token suffix, {device}, "
          f"{torch.get_num_threads()} threads")
    results = {}
    for shape in args.shapes.split(","):
        for n in prefixes:
            if n != prefixes[0] and shape in SHAPES:
                continue  # the random-weight shapes keep their one 2048-token figure
            key = shape if n == prefixes[0] else f"{shape}@{n}"
            results[key] = {"prefix_tokens": n, **asyncio.run(measure(shape, args.reps, n))}
    rows = [
        {"model": name, **r, "hit/floor": r["hit_device_ms"] / r["floor_ms"],
         "miss/hf": r["miss_ms"] / r["hf_prefill_ms"]}
        for name, r in results.items()
    ]
    print_table(rows, "time to first token (ms); goals: speedup >= 15 (demo, smollm2 at 2k), "
                "hit/floor <= 1.5, miss/hf <= 1.2")
    # CPU figures go to ttft.json; a GPU run goes beside them, named after the GPU.
    name = "ttft" if device == "cpu" else "ttft-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower())
    write_result(name, results)


if __name__ == "__main__":
    main()
