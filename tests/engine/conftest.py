"""Engine fixtures: the demo model is built once per session and shared by every engine.

The oracle is the same demo model (same seed, so the same weights) with transformers' own
SDPA attention and its own cache: what ``generate()`` returns is the reference output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch

from gateway.engine import (
    EngineConfig,
    FinishEvent,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
)
from gateway.engine.demo import build_model
from gateway.engine.engine import Engine
from gateway.engine.loader import LoadedModel, load_model

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
