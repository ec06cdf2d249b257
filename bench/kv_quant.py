"""What quantized KV pages cost in quality, on the real model.

The same prompts of 1–4k tokens (English prose from Python's own language reference,
asked to be summarised; a tenant per prompt, so no prompt hits another's blocks) are
answered with the full-precision cache (the model's own dtype) and with quantized pages,
and their first 32 greedy tokens and next-token distributions compared.

Two methods (``--method``):

- ``pages`` (the default): one engine in full precision. Each prompt is computed once;
  its cached pages are then replaced by the same pages quantized to each dtype and back
  (``convert_pages``: what an fp8/int8 tier holds, per block and head scales), and the
  prompt is asked again: all but its last block is read from those pages. One prefill per
  prompt serves every dtype, which is what makes 200 long prompts affordable on a CPU. It
  measures the quantized prefix; the 32 new tokens' own K/V stay in full precision (the
  ``--offload-kv-dtype`` case exactly, the ``--kv-dtype`` case up to those 32 tokens).
- ``engine``: one engine per dtype (``--kv-dtype``), each prompt computed and asked twice
  (``fresh``: the first request, whose decode reads its own quantized pages; ``cached``:
  the second, whose first token already comes through them). Three prefills per prompt.

Per dtype it reports:
- ``agree_32``: the share of the first 32 greedy tokens equal to the full-precision
  cache's, position by position up to the first difference (after one, the two runs no
  longer see the same text);
- ``exact_32``: the share of prompts whose 32 tokens are all equal;
- ``kl_first`` / ``kl_mean``: KL(full ‖ quantized) of the next-token distribution at the
  first token, and averaged over every position up to the first difference (the same
  context on both sides), in nats.

Goal: ``agree_32`` ≥ 0.98 for fp8. Writes ``bench/results/kv_quant.json`` (after every
20 prompts too, so a long run that is stopped keeps what it measured).

Run: ``python -m bench.kv_quant [--prompts 200] [--method pages|engine] [--model smollm2]``
(``pages``: about an hour for 200 prompts on two CPU cores).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.common import print_table, smoke, write_result
from kvgate.gateway.engine import EngineConfig, GenerateRequest, SamplingParams
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import load_model
from kvgate.gateway.engine.request import TokenEvent
from kvgate.kernels.layout import KV_DTYPES, convert_pages, dtype_name

NEW_TOKENS = 32
# what pages can hold, by the names stats give them (--dtypes): the quantized dtypes, and
# wider ones for scale (--method pages)
DTYPES = {dtype_name(d): d for d in KV_DTYPES.values()}


def corpus() -> str:
    """English prose that ships with Python: the language reference's topics (~110k tokens)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def prompts(tokenizer: Any, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """``n`` chat prompts of ``lo``..``hi`` tokens, each a different window of the corpus."""
    ids = tokenizer.encode(corpus())
    rng = random.Random(seed)
    lengths = [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)]
    rng.shuffle(lengths)  # any first part of a run covers the whole range
    out = []
    for length in lengths:
        start = rng.randrange(0, max(1, len(ids) - length))
        text = tokenizer.decode(ids[start:start + length])
        messages = [{"role": "user", "content": "Summarise this text.\n\n" + text}]
        out.append(tokenizer.apply_chat_template(messages))
    return out


@dataclass
class Run:
    """One prompt's two passes: greedy tokens and each step's log-probabilities."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def capture(engine: Engine, into: dict[str, list[torch.Tensor]]) -> None:
    """Keep every sampled row's log-softmax, by request id (the bench's own probe)."""
    run = engine.runner.run

    def probed(chunks: list[Any]) -> torch.Tensor:
        logits = run(chunks)
        sampling = [c for c in chunks if c.samples]
        for chunk, row in zip(sampling, logits, strict=True):
            into.setdefault(chunk.seq.request_id, []).append(
                torch.log_softmax(row.float(), -1).cpu())
        return logits

    engine.runner.run = probed  # type: ignore[method-assign]


async def generate(engine: Engine, rid: str, namespace: str, prompt: list[int],
                   max_tokens: int = NEW_TOKENS) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids: list[int] = []
    async for ev in engine.generate(GenerateRequest(rid, namespace, prompt, params)):
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
    return ids


def make_engine(kv_dtype: str, model: str, loaded: Any, max_tokens: int
                ) -> tuple[Engine, dict[str, list[torch.Tensor]]]:
    device_bytes = 2 * (max_tokens + 200) * 64 * 1024  # roomy for one prompt at fp32
    engine = Engine(EngineConfig(model=model, kv_dtype=kv_dtype, device_cache_bytes=device_bytes,
                                 host_cache_bytes=0, max_running=4), loaded=loaded)
    logprobs: dict[str, list[torch.Tensor]] = {}
    capture(engine, logprobs)
    return engine, logprobs


async def ask(engine: Engine, logprobs: dict[str, list[torch.Tensor]], run: Run, key: str,
              namespace: str, prompt: list[int]) -> None:
    rid = f"{namespace}-{key}"
    run.tokens[key] = await generate(engine, rid, namespace, prompt)
    run.logprobs[key] = logprobs.pop(rid)


def cached_pages(engine: Engine, namespace: str, prompt: list[int]) -> list[int]:
    """The device pages of the prompt's cached blocks (the engine is idle)."""
    store = engine.store
    blocks = [store.index.get(h) for h in store.block_hashes(namespace, prompt)]
    return [b.page for b in blocks if b is not None]


async def method_pages(model: str, loaded: Any, prompt_ids: list[list[int]], dtypes: list[str],
                       max_tokens: int, report: Callable[[list[Run]], None]) -> list[Run]:
    """One engine in full precision; each prompt's pages quantized in place per dtype."""
    engine, logprobs = make_engine("auto", model, loaded, max_tokens)
    layout = engine.layout
    quantized = {d: dataclasses.replace(layout, dtype=DTYPES[d]) for d in dtypes}
    await engine.start()
    runs: list[Run] = []
    t0 = time.perf_counter()
    try:
        for i, prompt in enumerate(prompt_ids):
            ns, run = f"tenant:{i}", Run()
            await generate(engine, f"{ns}-warm", ns, prompt, max_tokens=1)
            logprobs.pop(f"{ns}-warm", None)
            await ask(engine, logprobs, run, "auto", ns, prompt)
            pages = torch.tensor(cached_pages(engine, ns, prompt))
            pool = engine.store.device_pool
            original = pool.index_select(0, pages)
            for d, q in quantized.items():
                pool.index_copy_(0, pages, convert_pages(q, layout,
                                                         convert_pages(layout, q, original)))
                await ask(engine, logprobs, run, d, ns, prompt)
                pool.index_copy_(0, pages, original)
            engine.store.flush(ns)
            runs.append(run)
            if (i + 1) % 20 == 0:
                print(f"  {i + 1}/{len(prompt_ids)} prompts, {time.perf_counter() - t0:.0f} s",
                      flush=True)
                report(runs)
    finally:
        await engine.stop()
    return runs


async def method_engine(model: str, loaded: Any, prompt_ids: list[list[int]], dtypes: list[str],
                        max_tokens: int) -> list[Run]:
    """An engine per dtype; each prompt asked twice (fresh, then from the cache)."""
    runs = [Run() for _ in prompt_ids]
    for d in ["auto", *dtypes]:
        engine, logprobs = make_engine(d, model, loaded, max_tokens)
        await engine.start()
        try:
            for i, prompt in enumerate(prompt_ids):
                ns = f"tenant:{i}"
                await ask(engine, logprobs, runs[i], f"{d}/fresh", ns, prompt)
                await ask(engine, logprobs, runs[i], f"{d}/cached", ns, prompt)
                engine.store.flush(ns)
        finally:
            await engine.stop()
    return runs


def compare(runs: list[Run], ref: str, got: str) -> dict[str, float]:
    agree, exact, kl_first, kl_mean = [], [], [], []
    for run in runs:
        a, b = run.tokens[ref], run.tokens[got]
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        agree.append(same / len(a))
        exact.append(float(same == len(a)))
        # positions 0..same see the same context on both sides (the first difference too)
        kls = [float(torch.sum(p.exp() * (p - q)))
               for p, q in zip(run.logprobs[ref][:same + 1], run.logprobs[got][:same + 1],
                               strict=False)]
        kl_first.append(kls[0])
        kl_mean.append(statistics.fmean(kls))
    return {"prompts": len(runs), "agree_32": statistics.fmean(agree),
            "exact_32": statistics.fmean(exact), "kl_first": statistics.fmean(kl_first),
            "kl_mean": statistics.fmean(kl_mean)}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", choices=("pages", "engine"), default="pages")
    ap.add_argument("--prompts", type=int, default=smoke(200, 2))
    ap.add_argument("--min-tokens", type=int, default=smoke(1000, 40))
    ap.add_argument("--max-tokens", type=int, default=smoke(4000, 80))
    ap.add_argument("--dtypes", default="fp8,int8")
    args = ap.parse_args()
    model = smoke(args.model, "demo")
    dtypes = args.dtypes.split(",")
    loaded = load_model(EngineConfig(model=model))
    prompt_ids = prompts(loaded.tokenizer, args.prompts, args.min_tokens, args.max_tokens)
    lengths = [len(p) for p in prompt_ids]
    print(f"{len(prompt_ids)} prompts of {min(lengths)}-{max(lengths)} tokens on {model}, "
          f"method {args.method}")

    def rows_of(runs: list[Run]) -> list[dict[str, Any]]:
        if args.method == "pages":
            return [{"kv_dtype": d, "pass": "cached", **compare(runs, "auto", d)} for d in dtypes]
        return [{"kv_dtype": d, "pass": p, **compare(runs, f"auto/{p}", f"{d}/{p}")}
                for d in dtypes for p in ("fresh", "cached")]

    def report(runs: list[Run]) -> None:
        rows = rows_of(runs)
        print_table(rows, f"quantized KV pages vs the full-precision cache ({model}, "
                          f"{len(runs)} prompts, first {NEW_TOKENS} greedy tokens)")
        write_result("kv_quant", {
            "model": model, "method": args.method, "prompts": len(runs),
            "prompt_tokens": [min(lengths), max(lengths)], "new_tokens": NEW_TOKENS,
            "reference": "the model's dtype (float32 on CPU)",
            "goal": "agree_32 >= 0.98 for fp8", "rows": rows})

    if args.method == "pages":
        runs = asyncio.run(method_pages(model, loaded, prompt_ids, dtypes, args.max_tokens,
                                        report))
    else:
        runs = asyncio.run(method_engine(model, loaded, prompt_ids, dtypes, args.max_tokens))
    report(runs)


if __name__ == "__main__":
    main()
