"""Decode throughput on the real model: kvgate's engine against transformers' ``generate()``.

For batch sizes 1, 16 and 64, the same B prompts (distinct, ``PROMPT`` tokens each, so no
prefix is shared) are answered with ``NEW`` greedy tokens each (``ignore_eos``), and
tokens/s = B × NEW / wall time, prefill included on both sides:

- ``hf``: transformers' ``generate()`` on the batch (SDPA attention, its own dynamic KV
  cache, the same converted weights, dtype and thread count): the plain baseline;
- ``engine``: kvgate's engine in-process (paged KV, continuous batching), requests
  submitted at once;
- ``http``: the same through ``kvgate serve`` in its own process, each request a streamed
  chat completion from the OpenAI SDK on its own thread (batch 1 and 16 only): what a
  client sees, with the HTTP stream's cost included.

Goals (issue: a real model by default): engine ≥ 0.9 × hf at batch 1, ≥ 1.0 × at batch 16.
Writes ``bench/results/decode.json``.

Run: ``python -m bench.decode [--shape smollm2] [--batches 1,16,64] [--new 128]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import threading
import time
from typing import Any

import torch

from bench.common import print_table, smoke, write_result
from bench.ttft import reference_model
from kvgate.gateway.engine import EngineConfig, GenerateRequest, SamplingParams
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import load_model

PROMPT = 64
# KV room for batch 64 at 192 tokens (smollm2: 566 MiB, what generate()'s own cache holds)
POOL = 1 << 30


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    low, high = (32, 127) if vocab < 1000 else (300, min(vocab, 30000))  # demo: bytes
    return torch.randint(low, high, (batch, PROMPT), generator=g).tolist()


@torch.inference_mode()
def hf_tokens_per_s(hf: Any, batch: list[list[int]], new: int) -> float:
    ids = torch.tensor(batch)
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape == (len(batch), PROMPT + new)
    return len(batch) * new / elapsed


async def engine_tokens_per_s(engine: Engine, batch: list[list[int]], new: int,
                              tag: str) -> float:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        n = 0
        async for ev in engine.generate(GenerateRequest(f"{tag}-{i}", "tenant:bench", prompt,
                                                        params)):
            n += len(getattr(ev, "token_ids", []))
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
    elapsed = time.perf_counter() - start
    assert counts == [new] * len(batch), counts
    return len(batch) * new / elapsed


def http_tokens_per_s(url: str, key: str, model: str, batch: list[list[int]],
                      tokenizer: Any, new: int) -> float:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
    texts = [tokenizer.decode(p) for p in batch]
    counts: list[int] = [0] * len(batch)

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model=model, max_tokens=new, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": texts[i]}])
        for chunk in stream:
            if chunk.usage is not None:
                counts[i] = chunk.usage.completion_tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batch))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    client.close()
    assert counts == [new] * len(batch), counts
    return len(batch) * new / elapsed


async def interleaved(shape: str, batches: list[int], http_batches: list[int], new: int,
                      reps: int) -> dict[str, dict[int, list[float]]]:
    """Every repetition measures hf, the engine and HTTP one after another for each batch
    size, so a drift of the machine's speed (a shared host's neighbours) hits all three
    alike; odd repetitions run them in reverse order (ABBA), so going first or last favours
    neither side; ratios are taken within a repetition."""
    from testkit import ProcessServer

    hf = reference_model(shape)
    vocab = int(hf.config.vocab_size)
    loaded = load_model(EngineConfig(model=shape, device="cpu"))
    engine = Engine(EngineConfig(model=shape, device="cpu", device_cache_bytes=POOL,
                                 host_cache_bytes=0, max_running=max(batches)), loaded=loaded)
    rates: dict[str, dict[int, list[float]]] = {"hf": {}, "engine": {}, "http": {}}
    server = ProcessServer(model=shape, device="cpu", device_cache_bytes=POOL,
                           host_cache_bytes=0, max_running=max(batches))
    with server if http_batches else contextlib.nullcontext():
        key = server.admin.tenant("decode").key if http_batches else ""
        await engine.start()
        try:
            for b in batches:  # warm-ups: every side, every batch size, a few tokens
                hf_tokens_per_s(hf, prompts(b, vocab), 8)
                await engine_tokens_per_s(engine, prompts(b, vocab), 8, f"warm{b}")
                if b in http_batches:
                    http_tokens_per_s(server.url, key, shape, prompts(b, vocab),
                                      loaded.tokenizer, 8)
            for r in range(reps):
                for b in batches:
                    batch = prompts(b, vocab)

                    async def side(name: str, b: int = b, batch: list[list[int]] = batch,
                                   r: int = r) -> None:
                        if name == "hf":
                            rate = hf_tokens_per_s(hf, batch, new)
                        elif name == "engine":
                            rate = await engine_tokens_per_s(engine, batch, new, f"b{b}r{r}")
                        else:
                            rate = http_tokens_per_s(server.url, key, shape, batch,
                                                     loaded.tokenizer, new)
                        rates[name].setdefault(b, []).append(rate)

                    order = ["hf", "engine"] + (["http"] if b in http_batches else [])
                    for name in order if r % 2 == 0 else reversed(order):  # ABBA
                        await side(name)
        finally:
            await engine.stop()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", default=smoke("smollm2", "demo"))
    parser.add_argument("--batches", default=smoke("1,16,64", "1,4"))
    parser.add_argument("--http-batches", default=smoke("1,16", "1"))
    parser.add_argument("--new", type=int, default=smoke(128, 8))
    parser.add_argument("--reps", type=int, default=smoke(4, 1))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    http_batches = [int(b) for b in args.http_batches.split(",") if b]
    threads = torch.get_num_threads()
    print(f"decode, {args.shape}, prompt {PROMPT} + {args.new} new tokens, cpu, "
          f"{threads} threads, {args.reps} interleaved repetitions")
    rates = asyncio.run(interleaved(args.shape, batches, http_batches, args.new, args.reps))

    def ratio(side: str, b: int) -> float | None:
        if b not in rates[side]:
            return None
        return statistics.median(x / h for x, h in zip(rates[side][b], rates["hf"][b],
                                                       strict=True))

    rows = [{"batch": b, "hf_tok_s": statistics.median(rates["hf"][b]),
             "engine_tok_s": statistics.median(rates["engine"][b]),
             "engine/hf": ratio("engine", b),
             "http_tok_s": statistics.median(rates["http"][b]) if b in rates["http"] else None,
             "http/hf": ratio("http", b)}
            for b in batches]
    print_table(rows, "decode tokens/s (prefill included; ratios: median over repetitions of "
                "the ratio within one); goals: engine/hf >= 0.9 at batch 1, >= 1.0 at batch 16")
    write_result("decode", {"shape": args.shape, "prompt_tokens": PROMPT,
                            "new_tokens": args.new, "threads": threads, "reps": args.reps,
                            "rows": [{k: (round(v, 3) if isinstance(v, float) else v)
                                      for k, v in r.items()} for r in rows],
                            "raw": {side: {str(b): [round(x, 3) for x in xs]
                                           for b, xs in by.items()}
                                    for side, by in rates.items()}})


if __name__ == "__main__":
    main()
