"""The remote tier's cost model and circuit breaker: pure logic, no Valkey."""

from __future__ import annotations

import torch

from kvgate.cachestore.remote_tier import Breaker, CostModel, ModelShape
from kvgate.kernels.layout import KVLayout

# Llama-3-8B: 32 layers, 8 KV heads of 128, bf16 -> 2 MiB pages of 16 tokens
LLAMA_8B = ModelShape(params=7_000_000_000, num_layers=32, num_q_heads=32, head_dim=128)
LLAMA_LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16,
                        dtype=torch.bfloat16)
DEMO = ModelShape(params=11_300_000, num_layers=4, num_q_heads=8, head_dim=64)
DEMO_LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32)


def test_a_big_model_on_a_fast_gpu_is_not_fetched_over_a_slow_network() -> None:
    assert LLAMA_LAYOUT.page_bytes == 2 * 1024 * 1024
    slow = CostModel(LLAMA_LAYOUT, LLAMA_8B, 1.25e9, 0.0005, 2e14)  # 10 Gb/s
    fast = CostModel(LLAMA_LAYOUT, LLAMA_8B, 12.5e9, 0.0005, 2e14)  # 100 Gb/s
    assert not slow.worth_fetching(0, 64)
    assert fast.worth_fetching(0, 64)


def test_deeper_blocks_cost_more_to_compute_so_they_are_fetched_sooner() -> None:
    model = CostModel(LLAMA_LAYOUT, LLAMA_8B, 1.25e9, 0.0005, 2e14)
    assert model.compute_s(1000, 1) > model.compute_s(0, 1)
    assert model.worth_fetching(4000, 64)  # 64k tokens in: attention dominates


def test_the_round_trip_is_paid_once_per_fetch() -> None:
    model = CostModel(DEMO_LAYOUT, DEMO, 1.25e9, 0.05, 5e10)  # a 50 ms round trip
    assert not model.worth_fetching(0, 1)
    assert model.worth_fetching(0, 64)
    assert not model.worth_fetching(0, 0)


def test_the_demo_model_on_a_cpu_is_always_fetched() -> None:
    assert CostModel(DEMO_LAYOUT, DEMO, 1.25e9, 0.0005, 5e10).worth_fetching(0, 1)


def test_the_breaker_opens_after_failures_and_lets_one_trial_through() -> None:
    now = [0.0]
    breaker = Breaker(3, 5.0, clock=lambda: now[0])
    for _ in range(2):
        breaker.failure()
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    assert breaker.is_open and not breaker.allow()
    now[0] = 5.0
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one
    breaker.failure()
    now[0] = 9.0
    assert not breaker.allow()  # reopened at 5.0
    now[0] = 10.0
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow()
