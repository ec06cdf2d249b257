"""Pages in the tiers below the host are signed with the weights, not only the model's
name: other weights served under the same name (a checkpoint replaced in place, two
fine-tunes in directories of one name) never read each other's K/V."""

from __future__ import annotations

from kvgate.cachestore.disk_tier import DiskTierConfig
from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import load_model
from kvgate.gateway.engine.remote import weights_fingerprint
from kvgate.gateway.engine.request import GenerateRequest
from tests.engine.conftest import collect, greedy


def test_the_fingerprint_follows_the_weights_not_the_name(demo_loaded) -> None:
    same = load_model(EngineConfig(model="demo", seed=0))
    other = load_model(EngineConfig(model="demo", seed=1))
    assert same.model_id == other.model_id == demo_loaded.model_id
    assert weights_fingerprint(same.model) == weights_fingerprint(demo_loaded.model)
    assert weights_fingerprint(other.model) != weights_fingerprint(demo_loaded.model)


async def test_a_disk_tier_written_by_other_weights_of_the_same_name_is_a_miss(tmp_path) -> None:
    prompt = [(5 * i) % 200 + 3 for i in range(80)]

    async def cached(seed: int) -> int:
        engine = Engine(EngineConfig(
            model="demo", seed=seed, device_cache_bytes=16 << 20, host_cache_bytes=0,
            disk_tier=DiskTierConfig(path=str(tmp_path / "disk"), capacity_bytes=64 << 20)))
        await engine.start()
        try:
            _, _, fin = await collect(engine, GenerateRequest(f"r{seed}", "tenant:a", prompt,
                                                              greedy(2)))
            assert engine.remote is not None and engine.remote.drain()
            return fin.usage.cached_tokens
        finally:
            await engine.stop()

    assert await cached(0) == 0  # writes the prompt's blocks to disk
    assert await cached(1) == 0  # same name, other weights: verified misses (it rewrites them)
    assert await cached(1) == 64  # the same weights after a restart: read from disk
