"""The engine's decode step: host time outside the model's arithmetic, and the full step.

Two measurements, both through ``Engine.step()`` called directly (no engine thread, no
asyncio), on decode steps only (the prompts are computed first and not timed):

- host: the model's forward replaced by a no-op of the same output shape (a fixed hidden
  state and a fixed logits tensor of ``[batch, vocab]`` are handed back, nothing is
  computed), at batch 1, 16, 64 and 256 with a 128k-entry vocabulary, and again with the
  demo's own 262-entry vocabulary. What is left is scheduling, step inputs, sampling and
  post-processing (stop checks, events; no request of these mixes has stop strings, so
  none is detokenized in the engine: their text is made where the events are read). The difference between the two
  vocabularies is the work that grows with the vocabulary (sampling over ``[batch, vocab]``):
  on a GPU that runs on the device; on a CPU it is arithmetic like the model's.
- full: the real forward of the demo and the ~150M "bench" models at batch 64: step time
  and decode tokens per second.

Two sampling mixes: ``greedy`` (every request temperature 0) and ``mixed`` (a quarter each
of greedy; temperature 0.8 + top_p 0.95; top_k 50 + min_p 0.05; penalties + logprobs —
all seeded). Times are medians over the timed steps.

Goals: host time <= 1 ms at batch 64 and <= 3 ms at batch 256 (128k vocabulary, on a GPU);
decode tokens/s at batch 64 on the bench model >= 1.5x the code before the step rework.

Run: ``python -m bench.step --label after [--steps 8] [--parts host,full]``. Each label's
figures are merged into ``bench/results/step.json`` (``step-<gpu>.json`` on CUDA) beside the
other labels already there, so "before" and "after" sit side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch

from bench.common import RESULTS, print_table, smoke, write_result
from kvgate.gateway.engine import EngineConfig, GenerateRequest, SamplingParams
from kvgate.gateway.engine.commands import Add
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import load_model
from kvgate.gateway.engine.sequence import Sequence

BIG_VOCAB = 128 * 1024
PROMPT = 48


def mix_params(kind: str, i: int, max_tokens: int) -> SamplingParams:
    base: dict[str, Any] = dict(max_tokens=max_tokens, ignore_eos=True)
    if kind == "greedy" or i % 4 == 0:
        return SamplingParams(temperature=0.0, **base)
    if i % 4 == 1:
        return SamplingParams(temperature=0.8, top_p=0.95, seed=i, **base)
    if i % 4 == 2:
        return SamplingParams(temperature=1.0, top_k=50, min_p=0.05, seed=i, **base)
    return SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3,
                          repetition_penalty=1.1, logprobs=2, seed=i, **base)


class FixedLogits(torch.nn.Module):
    """Stands in for ``lm_head``: hands back rows of a fixed tensor, computes nothing."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.out_features = logits.shape[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: hidden.shape[0]]


def no_op_forward(engine: Engine, vocab: int, batch: int, token_range: int) -> None:
    """Replace the decoder and ``lm_head`` with stand-ins of the same output shapes. The
    logits favour ids the demo tokenizer can decode (bytes), so detokenizing is real work."""
    runner = engine.runner
    hidden_size = int(engine.model.config.hidden_size)
    device = runner.device
    hidden = torch.zeros(1, max(engine.config.max_batch_tokens, batch), hidden_size,
                         device=device, dtype=next(engine.model.parameters()).dtype)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g)
    logits[:, :token_range] += 12.0
    logits = logits.to(device=device, dtype=next(engine.model.parameters()).dtype)

    def decoder(input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=hidden[:, : input_ids.shape[1]])

    runner.decoder = decoder  # type: ignore[assignment]
    runner.lm_head = FixedLogits(logits)
    for name in ("graphs",):  # a captured decode graph would bypass the stand-ins
        if hasattr(runner, name):
            setattr(runner, name, None)


def build_engine(shape: str, batch: int, vocab: int | None, steps: int,
                 graphs: bool = True) -> Engine:
    config = EngineConfig(model=shape, max_running=max(batch, 1), max_queue=batch + 1,
                          max_batch_tokens=max(2048, batch * PROMPT),
                          device_cache_bytes=0, host_cache_bytes=1 << 20)
    if hasattr(config, "cuda_graphs"):
        config.cuda_graphs = graphs
    loaded = load_model(config)
    if vocab is not None and vocab != loaded.model.config.vocab_size:
        loaded.model.resize_token_embeddings(vocab, mean_resizing=False)
    pages = batch * -(-(PROMPT + steps + 8) // config.block_size) + 8
    layout_bytes = page_bytes(loaded.model, config.block_size)
    config.device_cache_bytes = pages * layout_bytes
    return Engine(config, loaded)


def page_bytes(model: torch.nn.Module, block: int) -> int:
    cfg = model.config  # type: ignore[attr-defined]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return int(cfg.num_hidden_layers * 2 * block * cfg.num_key_value_heads * head_dim * elem)


def decode_steps(engine: Engine, batch: int, kind: str, steps: int, warmup: int = 2) -> list[float]:
    """Seconds per decode step of ``batch`` sequences, after their prompts are computed."""
    g = torch.Generator().manual_seed(1)
    for i in range(batch):
        prompt = torch.randint(32, 127, (PROMPT,), generator=g).tolist()
        req = GenerateRequest(f"r{i}", "bench", prompt, mix_params(kind, i, steps + warmup + 4))
        engine._handle(Add(Sequence(req, engine.tokenizer)))
    while engine.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()  # prompts
    times = []
    for n in range(warmup + steps):
        assert len(engine.scheduler.running) == batch, "every sequence decodes each step"
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if n >= warmup:
            times.append(time.perf_counter() - start)
    return times


def host_rows(batches: list[int], steps: int) -> list[dict[str, Any]]:
    rows = []
    for vocab in (BIG_VOCAB, None):
        for batch in batches:
            for kind in ("greedy", "mixed"):
                engine = build_engine("demo", batch, vocab, steps + 2)
                no_op_forward(engine, int(engine.model.config.vocab_size), batch, 256)
                ms = statistics.median(decode_steps(engine, batch, kind, steps)) * 1e3
                rows.append({"vocab": int(engine.model.config.vocab_size), "batch": batch,
                             "sampling": kind, "step_ms": round(ms, 3)})
                print(rows[-1], flush=True)
    return rows


def full_rows(shapes: list[str], batch: int, steps: int, graphs: bool) -> list[dict[str, Any]]:
    rows = []
    for shape in shapes:
        for kind in ("greedy", "mixed"):
            engine = build_engine(shape, batch, None, steps + 2, graphs)
            ms = statistics.median(decode_steps(engine, batch, kind, steps)) * 1e3
            rows.append({"model": shape, "batch": batch, "sampling": kind,
                         "step_ms": round(ms, 2), "tokens_per_s": round(batch / ms * 1e3, 1)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="key the figures are stored under")
    parser.add_argument("--steps", type=int, default=smoke(8, 2),
                        help="timed decode steps per case")
    parser.add_argument("--parts", default="host,full")
    # smoke: batch 4 alone holds one request of each sampling mix (see mix_params)
    parser.add_argument("--batches", default=smoke("1,16,64,256", "4"))
    parser.add_argument("--shapes", default=smoke("demo,bench", "demo"))
    parser.add_argument("--full-batch", type=int, default=smoke(64, 4))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--eager", action="store_true",
                        help="full steps without CUDA graphs (CUDA only; CPU is always eager)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    figures: dict[str, Any] = {}
    if "host" in parts:
        figures["host"] = host_rows([int(b) for b in args.batches.split(",")], args.steps)
        print_table(figures["host"], "decode step with a no-op forward (ms, median); "
                                     "goals at 128k vocab: <= 1 ms at batch 64, <= 3 ms at 256")
    if "full" in parts:
        figures["full"] = full_rows(args.shapes.split(","), args.full_batch, args.steps,
                                    not args.eager)
        print_table(figures["full"], "full decode step (ms, median) and tokens/s")
    name = "step"
    if torch.cuda.is_available():
        gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
        name = f"step-{gpu}"
    path = RESULTS / f"{name}.json"
    data: dict[str, Any] = {}
    if path.exists():
        data = {k: v for k, v in json.loads(path.read_text()).items() if k != "machine"}
    data.setdefault("runs", {}).setdefault(args.label, {}).update(figures)
    data.setdefault("commands", {})[args.label] = " ".join(["python -m bench.step", *sys.argv[1:]])
    write_result(name, data)


if __name__ == "__main__":
    main()
