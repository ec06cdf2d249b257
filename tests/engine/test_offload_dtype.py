"""``--kv-dtype`` / ``--offload-kv-dtype`` through the engine: the host tier stores its own
dtype, a prefix demoted there and brought back is a billed cache hit, and a bad name is
refused before anything is built."""

from __future__ import annotations

import pytest
import torch

from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.request import GenerateRequest
from tests.engine.conftest import collect, greedy, wait_idle


async def test_a_prefix_demoted_to_an_fp8_host_tier_is_a_billed_hit(make_engine) -> None:
    probe = await make_engine()
    page = probe.layout.page_bytes  # the demo model's fp32 page
    engine = await make_engine(device_cache_bytes=12 * page, host_cache_bytes=8 * page,
                               offload_kv_dtype="fp8")
    stats = engine.cache_stats().as_dict()
    assert stats["device"]["kv_dtype"] == "float32" and stats["host"]["kv_dtype"] == "fp8"
    assert stats["host"]["capacity_pages"] > 3 * 8  # a quarter of the bytes per page
    prompt = [(7 * i) % 200 + 3 for i in range(64)]  # four full blocks
    want, _, first = await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(8)))
    await wait_idle(engine)
    other = [(11 * i) % 200 + 5 for i in range(180)]  # needs the whole device tier
    await collect(engine, GenerateRequest("b", "tenant:a", other, greedy(2)))
    await wait_idle(engine)
    assert engine.cache_stats().demotions.count >= 4
    got, _, again = await collect(engine, GenerateRequest("c", "tenant:a", prompt, greedy(8)))
    assert again.usage.cached_tokens == 48  # three blocks: the last is recomputed
    assert engine.cache_stats().promotions.count >= 3
    assert first.usage.cached_tokens == 0
    # the demo model's random logits are nearly flat, so fp8 K/V may change its tokens:
    # what quantization costs in quality is measured on the real model (bench.kv_quant)
    assert len(got) == len(want) == 8 and again.finish_reason == "length"


@pytest.mark.parametrize("field", ["kv_dtype", "offload_kv_dtype"])
def test_an_unknown_kv_dtype_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} 'fp4': use auto, fp8 or int8"):
        EngineConfig(**{field: "fp4"})


def test_kv_dtypes_resolve_auto_to_the_models_and_the_device_tiers() -> None:
    cfg = EngineConfig(device="cpu", kv_dtype="int8")
    assert cfg.kv_dtypes(torch.float32) == (torch.int8, torch.int8)
    cfg = EngineConfig(device="cpu", offload_kv_dtype="fp8")
    assert cfg.kv_dtypes(torch.bfloat16) == (torch.bfloat16, torch.float8_e4m3fn)
