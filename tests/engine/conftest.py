"""Engine fixtures: the demo model is built once per session and shared by every engine.

The oracle is the same demo model (same seed, so the same weights) with transformers' own
SDPA attention and its own cache: what ``generate()`` returns is the reference output.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch

from kvgate.cachestore import CacheStore
from kvgate.cachestore.block import DEVICE, HOST
from kvgate.gateway.engine import (
    EngineConfig,
    FinishEvent,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
)
from kvgate.gateway.engine.demo import build_model
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import LoadedModel, load_model
from kvgate.gateway.engine.sampler import SampleRow, sample, uniforms

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_loaded() -> LoadedModel:
    return load_model(EngineConfig(model="demo"))


@pytest.fixture(scope="session")
def oracle() -> Callable[[list[int], int], list[int]]:
    hf = build_model("demo", attn_implementation="sdpa")
    hf.generation_config.eos_token_id = None  # the engine's requests set ignore_eos

    @torch.inference_mode()
    def generate(prompt: list[int], max_new_tokens: int) -> list[int]:
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=hf.config.pad_token_id,
        )
        return out[0, len(prompt):].tolist()

    return generate


@pytest.fixture
async def make_engine(demo_loaded: LoadedModel) -> AsyncIterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    async def make(**overrides: Any) -> Engine:
        cfg = dict(device_cache_bytes=16 << 20, host_cache_bytes=16 << 20, max_batch_tokens=512)
        cfg.update(overrides)
        engine = Engine(EngineConfig(**cfg), loaded=demo_loaded)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


def pick(logits: torch.Tensor, params: SamplingParams, token_ids: list[int] | None = None,
         num_prompt: int = 0) -> int:
    """The token the step's sampler takes for one row ``logits`` (its default uniform)."""
    return int(sample(logits[None], [SampleRow(params, token_ids or (), num_prompt)])[0])


def picks(logits: torch.Tensor, params: SamplingParams, n: int) -> set[int]:
    """The tokens of ``n`` copies of the row ``logits`` sampled in one batch, each with its
    own uniform (draw ``i`` of seed 0)."""
    rows = [SampleRow(params, (), 0, float(u)) for u in uniforms([0] * n, range(n))]
    return set(sample(logits.repeat(n, 1), rows).tolist())


def greedy(max_tokens: int = 12, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine: Engine, request: GenerateRequest) -> tuple[list[int], str, FinishEvent]:
    ids: list[int] = []
    text = ""
    finish = None
    async for ev in engine.generate(request):
        if isinstance(ev, TokenEvent):
            ids += ev.token_ids
            text += ev.text
        else:
            finish = ev
    assert finish is not None
    return ids, text, finish


def prompt_of(engine_or_tok: Any, text: str) -> list[int]:
    tok = getattr(engine_or_tok, "tokenizer", engine_or_tok)
    return tok.apply_chat_template([{"role": "user", "content": text}])


async def wait_idle(engine: Engine) -> None:
    """Until no sequence runs and no block is referenced (what the engine thread does next)."""
    for _ in range(500):
        if engine.num_running() == 0 and engine.cache_stats().as_dict()["blocks"]["active"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine never went idle: {engine.cache_stats().as_dict()['blocks']}")


def assert_store_consistent(store: CacheStore) -> None:
    """Nothing holds pages any more: every used page is one indexed block's, none leaked,
    no reference left, the index a forest of live chains, and the stats agree."""
    assert not store.seqs
    device = [b.page for b in store.index.values() if b.tier == DEVICE]
    host = [b.page for b in store.index.values() if b.tier == HOST]
    for pool, used in ((store.device, device), (store.host, host)):
        assert len(used) == len(set(used)) == pool.num_used
        assert not any(pool._is_free[p] for p in used)
    for h, b in store.index.items():
        assert b.hash == h and b.alive and b.ref_count == 0
        if b.parent is not None:
            assert b.parent.alive and store.index.get(b.parent.hash) is b.parent
    stats = store.stats()
    assert stats.device.blocks["active"] == 0
    assert sum(stats.device.blocks.values()) == stats.device.capacity_pages
