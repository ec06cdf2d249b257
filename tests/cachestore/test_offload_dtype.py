"""A host tier of another KV dtype (``--offload-kv-dtype``): pages are converted as they
move, byte counts follow each tier's page, and a hit served from the host still reads the
right values (within the dtype's error)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvgate.cachestore import CacheStore, PageMoves
from kvgate.kernels.layout import FP8, KVLayout, convert_pages
from tests.cachestore.conftest import BLOCK, FakeClock
from tests.cachestore.test_store import fill, tokens

NS = "tenant:a"
# the relative error one conversion may add: e4m3 keeps 3 mantissa bits, int8 ±127 steps
REL = {FP8: 2.0**-4, torch.int8: 1 / 127}


def _layout(dtype: torch.dtype) -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=BLOCK, dtype=dtype)


@pytest.mark.parametrize("dtype", [FP8, torch.int8])
def test_convert_pages_round_trip_is_within_the_dtypes_error(dtype: torch.dtype) -> None:
    full, quant = _layout(torch.float32), _layout(dtype)
    pages = full.allocate_pool(5)
    pages.copy_(torch.randn(pages.shape, generator=torch.Generator().manual_seed(0)))
    pages[1, 0, 1] *= 1000  # one layer's V of one page far larger: its own scale
    q = convert_pages(full, quant, pages)
    assert q.dtype == torch.uint8 and q.shape == (5, quant.page_bytes)
    back = convert_pages(quant, full, q)
    # each (page, layer, k/v, head) is scaled by its own absolute maximum
    amax = pages.abs().amax(dim=(3, 5), keepdim=True)
    assert ((back - pages).abs() <= REL[dtype] * amax + 1e-6).all()
    assert torch.equal(convert_pages(full, full, pages), pages)
    with pytest.raises(ValueError, match="cannot become"):
        convert_pages(full, dataclasses.replace(quant, head_dim=4), pages)


def test_pages_of_another_quantized_dtype_convert_too() -> None:
    fp8, int8 = _layout(FP8), _layout(torch.int8)
    full = _layout(torch.float32)
    pages = full.allocate_pool(3)
    pages.copy_(torch.randn(pages.shape, generator=torch.Generator().manual_seed(1)))
    via = convert_pages(fp8, full, convert_pages(int8, fp8, convert_pages(full, int8, pages)))
    amax = pages.abs().amax(dim=(3, 5), keepdim=True)
    assert ((via - pages).abs() <= (REL[FP8] + 2 * REL[torch.int8]) * amax + 1e-6).all()


@pytest.mark.parametrize("dtype", [FP8, torch.int8])
def test_a_quantized_host_tier_holds_more_blocks_and_serves_hits(dtype: torch.dtype) -> None:
    device_layout, host_layout = _layout(torch.float32), _layout(dtype)
    pb = device_layout.page_bytes
    store = CacheStore(device_layout, 3 * pb, 4 * pb, clock=FakeClock(),
                       host_layout=host_layout)
    assert store.host.num_pages == (4 * pb) // host_layout.page_bytes > 4 * 3
    prompt = tokens(2 * BLOCK)
    a = store.open("a", NS)
    store.match(a, prompt)
    store.allocate(a, len(prompt))
    gen = torch.Generator().manual_seed(2)
    for page in a.block_table:
        store.device_pool[page].copy_(torch.randn(device_layout.page_shape, generator=gen))
    original = [store.device_pool[p].clone() for p in a.block_table]
    store.commit(a, prompt)
    store.release(a)
    b = store.open("b", NS)  # pushes both blocks to the host, converted
    store.match(b, tokens(3 * BLOCK, start=100))
    assert store.allocate(b, 3 * BLOCK)
    fill(store, b, lambda page: -1.0)
    stats = store.stats()
    assert stats.host.blocks["offloaded"] == 2
    assert stats.demotions == PageMoves(2, 2 * host_layout.page_bytes)
    assert stats.host.as_dict()["kv_dtype"] == ("fp8" if dtype == FP8 else "int8")
    assert stats.device.as_dict()["kv_dtype"] == "float32"
    assert stats.host.as_dict()["page_bytes"] == host_layout.page_bytes
    store.release(b)
    c = store.open("c", NS)
    m = store.match(c, [*prompt, 7])
    assert (m.num_blocks, m.device_hits, m.host_hits) == (2, 0, 2)
    for page, want in zip(c.block_table, original, strict=True):
        got = store.device_pool[page]
        amax = want.abs().amax(dim=(2, 4), keepdim=True)
        assert ((got - want).abs() <= REL[dtype] * amax + 1e-6).all()
        assert not torch.equal(got, want)  # it did go through the quantized tier


def test_reservations_count_each_tiers_own_page_bytes() -> None:
    device_layout, host_layout = _layout(torch.float32), _layout(FP8)
    pb, hb = device_layout.page_bytes, host_layout.page_bytes
    store = CacheStore(device_layout, 8 * pb, 8 * pb, clock=FakeClock(), host_layout=host_layout)
    store.set_reservation(NS, 2 * pb, 3 * hb)
    assert store.reservations()[NS] == {"device": 2 * pb, "host": 3 * hb}
