"""store_kv (reference and Triton) and copy_pages, on strided views of real pools."""

import importlib

import pytest
import torch

from kvgate import kernels
from kvgate.kernels import KVLayout, reference
from kvgate.kernels.copy import contiguous_runs
from tests.kernels.cases import DTYPES


def _pool(layout: KVLayout, pages: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pool = layout.allocate_pool(pages, device)
    pool.copy_(torch.randn(pool.shape, generator=gen).to(layout.dtype))
    return pool


def _expected_store(pool, layer, k, v, slots, block_size):
    """Token by token, in plain indexing: what store_kv must leave in the pool."""
    want = pool.clone()
    k_cache, v_cache = want[:, layer, 0], want[:, layer, 1]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = k[t]
            v_cache[slot // block_size, slot % block_size] = v[t]
    return want


def _triton_store():
    pytest.importorskip("triton")
    return importlib.import_module("kvgate.kernels.triton_store")


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_heads", "head_dim"), [(1, 64), (2, 128), (3, 80)])
def test_store_kv_writes_slots_and_skips_padding(impl, dtype, kv_heads, head_dim, device):
    store = reference.store_kv if impl == "reference" else _triton_store().store_kv
    layout = KVLayout(num_layers=3, num_kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                      dtype=dtype)
    pool = _pool(layout, 6, seed=2, device=device)
    gen = torch.Generator().manual_seed(3)
    slots = torch.tensor([0, 17, -1, 95, 31, -1, 48, 5], dtype=torch.int64, device=device)
    # [kv_heads, T, D] transposed, as the engine hands them over from the model's layout.
    k = torch.randn(kv_heads, len(slots), head_dim, generator=gen).to(dtype).to(device).transpose(0, 1)
    v = torch.randn(kv_heads, len(slots), head_dim, generator=gen).to(dtype).to(device).transpose(0, 1)
    want = _expected_store(pool, 1, k, v, slots, 16)
    k_cache, v_cache = layout.layer_kv(pool, 1)
    assert not k_cache.is_contiguous()
    store(k, v, k_cache, v_cache, slots)
    assert torch.equal(pool, want)  # written slots exact; every other byte untouched


def test_dispatch_forces_triton_on_cpu(monkeypatch):
    """KVGATE_FORCE_TRITON=1 routes CPU tensors to Triton (the interpreter here)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("with CUDA the tests use CUDA tensors; forcing is for CPU machines")
    calls = []
    triton_store = _triton_store()
    monkeypatch.setattr(triton_store, "store_kv", lambda *a: calls.append(a))
    layout = KVLayout(1, 1, 64, 16, torch.float32)
    k_cache, v_cache = layout.layer_kv(_pool(layout, 2, 0, "cpu"), 0)
    k = torch.randn(1, 1, 64)
    kernels.store_kv(k, k, k_cache, v_cache, torch.tensor([3]))
    assert calls == []
    monkeypatch.setenv("KVGATE_FORCE_TRITON", "1")
    kernels.store_kv(k, k, k_cache, v_cache, torch.tensor([3]))
    assert len(calls) == 1


def test_contiguous_runs_group_pages_consecutive_on_both_sides():
    assert contiguous_runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8]) == [
        (4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)
    ]
    assert contiguous_runs([], []) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_pages_round_trip_between_pools(dtype, device):
    """Device pool → host pool → fresh device pages gives back the same bytes."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    device_pool = _pool(layout, 10, seed=4, device=device)
    host_pool = layout.allocate_pool(8, "cpu", pin_memory=True)
    host_pool.copy_(_pool(layout, 8, seed=5, device="cpu"))
    host_before = host_pool.clone()
    src = [7, 2, 3, 4, 9]  # a run (2, 3, 4) and two singles
    dst = [0, 5, 6, 7, 1]
    event = kernels.copy_pages(device_pool, host_pool, src, dst)
    if device.type == "cuda":
        assert isinstance(event, torch.cuda.Event)
        event.synchronize()
    else:
        assert event is None
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(host_pool[d], device_pool[s].cpu())
    untouched = [p for p in range(8) if p not in dst]
    assert torch.equal(host_pool[untouched], host_before[untouched])

    back = [8, 0, 3, 5, 6]
    originals = device_pool[src].clone()
    event = kernels.copy_pages(host_pool, device_pool, torch.tensor(dst), torch.tensor(back))
    if event is not None:
        torch.cuda.current_stream().wait_event(event)
    assert torch.equal(device_pool[back], originals)


def test_copy_pages_device_to_device(device):
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float16)
    a, b = _pool(layout, 5, seed=6, device=device), _pool(layout, 5, seed=7, device=device)
    event = kernels.copy_pages(a, b, torch.tensor([4, 0]), torch.tensor([1, 3]))
    if event is not None:
        event.synchronize()
    assert torch.equal(b[1], a[4]) and torch.equal(b[3], a[0])


def test_copy_pages_rejects_mismatched_pools():
    a = KVLayout(1, 1, 64, 16, torch.float16).allocate_pool(2)
    b = KVLayout(1, 2, 64, 16, torch.float16).allocate_pool(2)
    with pytest.raises(ValueError, match="pools differ"):
        kernels.copy_pages(a, b, [0], [1])
    with pytest.raises(ValueError, match="source pages"):
        kernels.copy_pages(a, a, [0, 1], [1])
