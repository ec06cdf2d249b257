"""Decode-step time with and without a grammar on a ~128k-entry vocabulary and on the real
default model's 49k vocabulary (goal ≤ 5% overhead at batch 16).

Run: ``python -m bench.structured [--shapes synthetic-128k,smollm2]``.

``smollm2``: the real model (SmolLM2-135M-Instruct, 49,152 entries) answering a chat prompt
that asks for a JSON description, free or under the schema, so the grammar follows what a
real model writes (strings end, keys close) rather than a random model's endless string.

``synthetic-128k``: a byte-level BPE vocabulary of 128,256 entries is
synthesized (the 256 bytes, then random words, JSON punctuation and digit runs, half with a
leading space), so the grammar engine sees a Llama-3-sized vocabulary. The model is the demo
shape (4 layers, hidden 512, random weights) with a 128k-row lm_head, in the real ``Engine``
on this machine's CPU. ``batch`` requests decode together, greedy, either free or each under
a JSON schema whose string the random model keeps extending (so every step masks); a step is
timed inside the engine (``Engine.step``), and only steps where all ``batch`` sequences
decode count. ``mask_ms`` is ``GrammarEngine.apply`` alone (fill every mask in one parallel
call, unpack, one masked store).

``overhead`` is ``mask_ms / step_ms_plain``: the work a grammar adds to a step (advancing
each matcher by its token, a few µs per sequence, aside). ``overhead_measured`` is the
ratio of the two step medians, which on a shared 2-core machine moves by ±20% from run to
run, so it is reported but not the figure to judge by. ``step_ms_for_5pct`` is the step
time at which the mask cost would be exactly 5%.

The step compared against is this CPU step, which includes the engine's per-row sampling
over 128k logits. A GPU forward of the same batch takes a few ms, and the mask cost (CPU,
not overlapped with the forward in this engine) would weigh correspondingly more.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import print_table, smoke, write_result
from kvgate.gateway.engine import (
    EngineConfig,
    GenerateRequest,
    SamplingParams,
    attention,
    json_schema_spec,
)
from kvgate.gateway.engine.demo import SHAPES, _byte_of
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import LoadedModel
from kvgate.gateway.engine.tokenizer import TextTokenizer

VOCAB = smoke(128_256, 8_192)
BATCHES = smoke((1, 16, 64), (1, 4))
DECODE_TOKENS = smoke(12, 4)
EOT = "<|eot|>"
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
ASK = 'Describe the city of Paris in detail, as JSON: {"text": "..."}'


def synth_tokenizer(size: int = VOCAB) -> Tokenizer:
    """A byte-level BPE tokenizer of ``size`` entries (no merges: only the vocabulary
    matters to the grammar engine)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    pieces = ['":', '","', '{"', '"}', "},", "],", '":"', '":[', ".", ","]
    space = "Ġ"  # the byte-level spelling of " "
    while len(vocab) < size - 1:
        roll = rng.random()
        if roll < 0.05:
            word = rng.choice(pieces) + "".join(rng.choices(letters, k=rng.randint(0, 3)))
        elif roll < 0.1:
            word = "".join(rng.choices("0123456789", k=rng.randint(2, 4)))
        else:
            word = "".join(rng.choices(letters, k=rng.randint(2, 10)))
        vocab.setdefault(space + word if rng.random() < 0.5 else word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def build(shape: str) -> Engine:
    if shape == "smollm2":
        return Engine(EngineConfig(model="smollm2", device="cpu", max_running=64,
                                   max_batch_tokens=4096, device_cache_bytes=512 << 20,
                                   host_cache_bytes=0))
    tok = TextTokenizer(synth_tokenizer(), None, eos_tokens=[EOT])
    dims = SHAPES["demo"]
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers, num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads, head_dim=dims.head_dim,
        max_position_embeddings=4096, tie_word_embeddings=True)
    config._attn_implementation = attention.register()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    loaded = LoadedModel(model, tok, "bench-128k", {"context_length": 4096})
    return Engine(EngineConfig(device="cpu", max_running=64, max_batch_tokens=4096,
                               device_cache_bytes=64 << 20, host_cache_bytes=0), loaded)


async def run(engine: Engine, batch: int, grammar: bool) -> tuple[float, float]:
    """Median decode step (ms) with ``batch`` sequences, and median mask time (ms)."""
    steps: list[tuple[int, float]] = []
    masks: list[float] = []
    real_step, real_apply = engine.step, engine.grammars.apply

    def step() -> None:
        running = len(engine.scheduler.running)
        t0 = time.perf_counter()
        real_step()
        steps.append((running, (time.perf_counter() - t0) * 1e3))

    def apply(computed: Any) -> None:
        t0 = time.perf_counter()
        real_apply(computed)
        if any(c.seq.grammar is not None for c, _ in computed):
            masks.append((time.perf_counter() - t0) * 1e3)

    engine.step, engine.grammars.apply = step, apply  # type: ignore[method-assign]
    spec = json_schema_spec(SCHEMA, strict=True) if grammar else None
    prompt = (engine.tokenizer.apply_chat_template([{"role": "user", "content": ASK}])
              if engine.model_info.get("id") == "smollm2" else list(range(300, 308)))

    async def one(i: int) -> None:
        params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True,
                                structured=spec)
        req = GenerateRequest(f"b{batch}-{grammar}-{i}", f"ns{i}", prompt, params)
        async for _ in engine.generate(req):
            pass

    try:
        await asyncio.gather(*(one(i) for i in range(batch)))
    finally:
        engine.step, engine.grammars.apply = real_step, real_apply  # type: ignore[method-assign]
    full = [ms for n, ms in steps[1:] if n == batch]  # after the prefill step
    return statistics.median(full), statistics.median(masks[1:]) if len(masks) > 1 else 0.0


async def measure(shape: str) -> list[dict[str, Any]]:
    engine = build(shape)
    await engine.start()
    rows = []
    try:
        await run(engine, 4, True)  # warm up (compiles the grammar, builds lexer states)
        for batch in BATCHES:
            plain, _ = await run(engine, batch, False)
            with_grammar, mask = await run(engine, batch, True)
            rows.append({"batch": batch, "step_ms_plain": round(plain, 2),
                         "step_ms_grammar": round(with_grammar, 2), "mask_ms": round(mask, 3),
                         "overhead": round(mask / plain, 4),
                         "overhead_measured": round(with_grammar / plain - 1, 4),
                         # the step time at which this mask cost is 5%
                         "step_ms_for_5pct": round(mask / 0.05, 2)})
    finally:
        await engine.stop()
    vocab = engine.vocab_size
    print_table(rows, f"engine decode step, {shape} (vocab {vocab}), CPU; grammar = JSON schema")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shapes", default=smoke("synthetic-128k,smollm2", "synthetic-128k"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    shapes = {}
    for shape in args.shapes.split(","):
        rows = asyncio.run(measure(shape))
        shapes[shape] = {"vocab": 49_152 if shape == "smollm2" else VOCAB, "rows": rows}
    write_result("structured", {
        "shapes": shapes, "goal_overhead_batch16": 0.05,
        "step": "the engine's own decode step (Engine.step: forward, masks, sampling) on this "
                "CPU: the demo shape with a synthetic 128k vocabulary and lm_head, and the "
                "real smollm2 (49k); mask_ms = GrammarEngine.apply",
    })


if __name__ == "__main__":
    main()
