"""Quantized KV pages (fp8 e4m3, int8): quantization bounds, the store's growing scales,
and paged attention over dequantized pages (torch reference and Triton twins).

Attention is checked twice: tightly against the fp32 oracle over the *dequantized* K/V
(the kernels must read exactly what was stored), and loosely against the original K/V
(what quantization costs). The Triton cases run in the interpreter on a CPU machine
(``conftest.py``), so they are few and small.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from kvgate import kernels
from kvgate.kernels import KVLayout, reference
from kvgate.kernels.layout import FP8, QMAX, dequantize, grown_scale, quantize, scale_for
from tests.kernels.paged import (
    ATOL,
    PagedCase,
    cu_seqlens,
    decode_oracle,
    make_case,
    prefill_oracle,
    random_q,
)

QDTYPES = [pytest.param(FP8, id="fp8"), pytest.param(torch.int8, id="int8")]
FP8_REL = 2.0**-4  # e4m3 keeps 3 mantissa bits: half an ulp is at most 2**-4 of the value
FP8_SUB = 2.0**-10  # half the subnormal step (2**-9), in units of the scale
# Attention over quantized K/V against the original K/V (unit-variance values, d = 64):
# (worst element, mean) of the difference; measured worst over these shapes and 6 seeds:
# fp8 0.12 and 0.012, int8 0.018 and 0.0034.
LOOSE = {FP8: (0.2, 0.02), torch.int8: (0.04, 0.006)}


def _triton(name: str):
    pytest.importorskip("triton")
    module = importlib.import_module(f"kvgate.kernels.{name}")
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        kernel = next(v for k, v in vars(module).items() if k.endswith("_kernel"))
        if not isinstance(kernel, InterpretedFunction):
            pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set")
    return module


def _store(impl: str):
    return reference.store_kv if impl == "reference" else _triton("triton_store").store_kv


def _error_bound(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a stored value may differ from ``x`` by, with its block's final ``scale``
    (``layout.grown_scale``: int8 within one step, fp8 within half an ulp or half a
    subnormal step); a little fp32 slack on top."""
    if dtype == torch.int8:
        return scale * (1 + 1e-5)
    return torch.maximum(FP8_REL * x.abs(), 2 * FP8_SUB * scale) * (1 + 1e-5) + 1e-12


def _valid_garbage(layout: KVLayout, pool: torch.Tensor, seed: int) -> None:
    """Fill a quantized pool with what reused pages hold: values and positive scales."""
    gen = torch.Generator().manual_seed(seed)
    values = layout.values(pool)
    values.copy_(quantize(torch.randn(values.shape, generator=gen) * 50, torch.ones(()),
                          layout.dtype))
    layout.scales(pool).copy_(torch.rand(layout.scales(pool).shape, generator=gen) + 0.01)


# ---------------------------------------------------------------- quantize / scales


@pytest.mark.parametrize("dtype", QDTYPES)
def test_quantize_round_trip_within_the_dtype_bound(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 32, generator=gen) * torch.logspace(-3, 3, 64)[:, None, None]
    scale = scale_for(x.abs().amax(-1, keepdim=True), dtype)
    q = quantize(x, scale, dtype)
    assert q.dtype == dtype
    back = dequantize(q, scale, torch.float32)
    assert bool(((back - x).abs() <= _error_bound(x, scale, dtype)).all())
    # the block's amax lands on the dtype's largest value, and nothing is clipped
    assert torch.equal(q.float().abs().amax(-1), torch.full((64, 4), QMAX[dtype]))
    # a zero scale stores zeros; a value past scale * QMAX saturates
    assert not quantize(x, torch.zeros(()), dtype).float().any()
    assert quantize(torch.tensor([1e6, -1e6]), torch.ones(()), dtype).float().tolist() == [
        QMAX[dtype], -QMAX[dtype]]


def test_grown_scale_rule():
    old = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.3, 0.3])
    need = torch.tensor([0.0, 0.75, 0.5, 1.0, 2.0, 0.31, 5.0])
    new = grown_scale(old, need)
    assert new[:5].tolist() == [0.0, 0.75, 1.0, 1.0, 2.0]
    grown = new[5:] / old[5:]
    assert torch.equal(grown, torch.exp2(torch.log2(grown).round()))  # powers of two
    assert bool((new[5:] >= need[5:]).all()) and bool((new[5:] / 2 < need[5:]).all())

    # a growth no power of two up to 2**126 covers (or an overflowing ratio) starts over
    huge = grown_scale(torch.tensor([1e-30, 1e-40, 1e-38]), torch.tensor([1e10, 1.0, 3.0]))
    assert huge.tolist() == pytest.approx([1e10, 1.0, 3.0])


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", QDTYPES)
def test_a_block_of_tiny_values_then_huge_ones_covers_the_huge_ones(impl, dtype):
    """A block whose first token is ~1e-35 and whose next is ~1e3: the scale must cover
    the second (no power-of-two growth within 2**126 does), so nothing is clamped."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype=dtype)
    pool = layout.allocate_pool(2)
    store = _store(impl)
    k_cache, v_cache = layout.layer_kv(pool, 0)
    k_scale, v_scale = layout.layer_scales(pool, 0)
    tiny = torch.full((1, 1, 8), 1e-35)
    store(tiny, tiny, k_cache, v_cache, torch.tensor([4]), k_scale, v_scale)
    big = torch.linspace(-1e3, 1e3, 8).reshape(1, 1, 8)
    store(big, big, k_cache, v_cache, torch.tensor([5]), k_scale, v_scale)
    got = dequantize(k_cache[1, 1], k_scale[1][:, None], torch.float32)
    assert torch.allclose(got, big[0], rtol=0.07, atol=1e3 / QMAX[dtype])
    assert bool(torch.isfinite(layout.values(pool).float()).all())


# ---------------------------------------------------------------- store_kv


def _slots(pages: list[int], positions: range | list[int], block_size: int) -> list[int]:
    return [pages[p // block_size] * block_size + p % block_size for p in positions]


def _store_scenario(block_size: int):
    """Store calls as the engine makes them, over pages that are reused: (slots, kv
    magnitude per token) per call. Sequence A on pages [3, 0, 6] (prefill, then decode
    steps whose values grow, so the scales grow); B on [4, 7, 8] (chunked, padded with
    -1); then C takes page 3 over from slot 0 with small values (A finished). Pages 1, 2,
    5 and 9 are never written."""
    a, b, c = [3, 0, 6], [4, 7, 8], [3]
    bs = block_size
    calls = [
        (_slots(a, range(bs + 3), bs), [1.0] * (bs + 3)),
        (_slots(a, [bs + 3], bs) + _slots(b, range(3), bs) + [-1], [4.0, 1.0, 1.0, 1.0, 9.0]),
        ([-1, *_slots(b, range(3, 6), bs), *_slots(a, [bs + 4], bs)], [9.0, 0.5, 2.0, 3.0, 30.0]),
        (_slots(a, [bs + 5], bs) + _slots(b, [6], bs), [0.01, 70.0]),
        (_slots(c, range(2), bs), [0.05, 0.02]),
        (_slots(b, [7], bs) + _slots(c, [2], bs), [1.0, 0.1]),
    ]
    return calls


def _run_scenario(store, layout: KVLayout, pool: torch.Tensor, check) -> None:
    gen = torch.Generator().manual_seed(7)
    truth: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bs = layout.block_size
    for slots, mags in _store_scenario(bs):
        n = len(slots)
        mag = torch.tensor(mags)[:, None, None]
        k = torch.randn(n, layout.num_kv_heads, layout.head_dim, generator=gen) * mag
        v = torch.randn(n, layout.num_kv_heads, layout.head_dim, generator=gen) * mag
        for t, s in enumerate(slots):
            if s >= 0:
                if s % bs == 0:  # the page starts over: its old tokens are gone
                    truth = {x: kv for x, kv in truth.items() if x // bs != s // bs}
                truth[s] = (k[t], v[t])
        store(k, v, *layout.layer_kv(pool, 1), torch.tensor(slots),
              *layout.layer_scales(pool, 1))
        check(truth)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", QDTYPES)
def test_store_keeps_every_token_within_bound_as_scales_grow(impl, dtype, block_size):
    """After every call, every live token dequantizes to within the dtype's bound of what
    was stored, with its block's final scale; the scale covers the block's amax and is
    below twice what it needs; other layers and other pages are untouched."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=block_size,
                      dtype=dtype)
    pool = layout.allocate_pool(10)
    _valid_garbage(layout, pool, seed=1)
    before = pool.clone()
    k_cache, v_cache = layout.layer_kv(pool, 1)
    k_scale, v_scale = layout.layer_scales(pool, 1)
    grew = []

    def check(truth):
        for which, cache, scales in ((0, k_cache, k_scale), (1, v_cache, v_scale)):
            for page in {s // block_size for s in truth}:
                live = [s for s in truth if s // block_size == page]
                x = torch.stack([truth[s][which] for s in live])  # [n, kvh, D]
                got = dequantize(cache[page, [s % block_size for s in live]],
                                 scales[page][None, :, None], torch.float32)
                bound = _error_bound(x, scales[page][None, :, None], dtype)
                assert bool(((got - x).abs() <= bound).all()), (page, which)
                need = scale_for(x.abs().amax((0, 2)), dtype)
                assert bool((scales[page] >= need).all())
                assert bool((scales[page] <= 2 * need).all())
                grew.append(bool((scales[page] > need * 1.0001).any()))
        # layer 0 and the pages no call wrote keep their bytes
        values, old_values = layout.values(pool), layout.values(before)
        assert torch.equal(values[:, 0].view(torch.uint8), old_values[:, 0].view(torch.uint8))
        assert torch.equal(layout.scales(pool)[:, 0], layout.scales(before)[:, 0])
        assert torch.equal(pool[[1, 2, 5, 9]], before[[1, 2, 5, 9]])

    _run_scenario(_store(impl), layout, pool, check)
    assert any(grew)  # the scenario did make scales grow


@pytest.mark.parametrize("dtype", QDTYPES)
def test_store_triton_writes_the_same_bytes_as_the_reference(dtype):
    """The Triton store is the reference's twin bit for bit (rounding done in fp32, ties
    to even), through growth, padding and page reuse, with tokens in any order."""
    store = _store("triton")
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=24, block_size=8, dtype=dtype)
    ref_pool = layout.allocate_pool(10)
    _valid_garbage(layout, ref_pool, seed=2)
    tri_pool = ref_pool.clone()
    _run_scenario(reference.store_kv, layout, ref_pool, lambda truth: None)
    _run_scenario(store, layout, tri_pool, lambda truth: None)
    assert torch.equal(ref_pool, tri_pool)
    # a page's tokens need not be adjacent in the slot mapping
    gen = torch.Generator().manual_seed(3)
    slots = torch.tensor([9, 72, -1, 10, 0, 73, 11, 1])
    k = torch.randn(8, 3, 24, generator=gen) * torch.arange(1, 9)[:, None, None]
    v = torch.randn(8, 3, 24, generator=gen)
    for impl, pool in ((reference.store_kv, ref_pool), (store, tri_pool)):
        impl(k, v, *layout.layer_kv(pool, 0), slots, *layout.layer_scales(pool, 0))
    assert torch.equal(ref_pool, tri_pool)


def test_dispatch_requires_scales_exactly_for_quantized_caches():
    layout = KVLayout(1, 1, 16, 4, FP8)
    pool = layout.allocate_pool(2)
    k = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="needs both k_scale and v_scale"):
        kernels.store_kv(k, k, *layout.layer_kv(pool, 0), torch.tensor([0]))
    plain = KVLayout(1, 1, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="needs no scales"):
        kernels.store_kv(k, k, *plain.layer_kv(plain.allocate_pool(2), 0), torch.tensor([0]),
                         *layout.layer_scales(pool, 0))


# ---------------------------------------------------------------- attention


@dataclasses.dataclass
class QCase:
    case: PagedCase  # K/V as originally given (ks, vs), and the page geometry
    deq: PagedCase  # the same with ks, vs as stored (dequantized)
    layout: KVLayout
    pool: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        k_cache, v_cache = self.layout.layer_kv(self.pool, 1)
        return k_cache, v_cache, self.case.block_tables


def make_qcase(seq_lens: list[int], q_heads: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype, block_size: int = 16, seed: int = 0) -> QCase:
    """A paged case whose pool is quantized: each sequence's K/V stored as a prefill
    would (one ``store_kv`` call), every other page holding valid garbage."""
    case = make_case(seq_lens, q_heads, kv_heads, head_dim, torch.float32, "cpu",
                     block_size, seed)
    layout = KVLayout(2, kv_heads, head_dim, block_size, dtype)
    pool = layout.allocate_pool(case.pool.shape[0])
    _valid_garbage(layout, pool, seed)
    k_cache, v_cache = layout.layer_kv(pool, 1)
    k_scale, v_scale = layout.layer_scales(pool, 1)
    ks, vs = [], []
    for b, n in enumerate(seq_lens):
        table = case.block_tables[b]
        slots = table[torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
        reference.store_kv(case.ks[b], case.vs[b], k_cache, v_cache, slots, k_scale, v_scale)
        ks.append(reference.gather_kv(k_cache, table, n, k_scale))
        vs.append(reference.gather_kv(v_cache, table, n, v_scale))
    deq = dataclasses.replace(case, ks=ks, vs=vs)
    return QCase(case, deq, layout, pool, k_scale, v_scale)


def _attention(impl: str):
    return reference if impl == "reference" else _triton("triton_attention")


def _check(out, q, want_deq, want_orig, dtype, q_dtype):
    assert out.dtype == q_dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), want_deq, atol=ATOL[q_dtype], rtol=0)
    worst, mean = LOOSE[dtype]
    torch.testing.assert_close(out.float(), want_orig, atol=worst + ATOL[q_dtype], rtol=0)
    assert float((out.float() - want_orig).abs().mean()) <= mean + ATOL[q_dtype]


DECODE = [  # (seq_lens, q_heads, kv_heads, block_size)
    pytest.param([37], 2, 2, 16, id="mha"),
    pytest.param([1, 17, 50, 16], 8, 2, 16, id="gqa4-mixed"),
    pytest.param([9, 30], 8, 1, 4, id="gqa8-block4"),
    pytest.param([23, 5], 6, 2, 8, id="gqa3-block8"),
]
PREFILL = [  # (q_lens, seq_lens, q_heads, kv_heads, block_size)
    pytest.param([19], [19], 2, 2, 16, id="fresh"),
    pytest.param([5], [37], 8, 2, 16, id="prefix-and-tail"),
    pytest.param([3, 16, 1], [3, 40, 17], 4, 1, 4, id="mixed-block4"),
    pytest.param([6, 1], [30, 9], 6, 2, 8, id="gqa3-block8"),
]


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=["q32", "qbf16"])
@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize(("lens", "q_heads", "kv_heads", "block_size"), DECODE)
def test_reference_decode_on_quantized_pages(lens, q_heads, kv_heads, block_size, dtype,
                                             q_dtype):
    qc = make_qcase(lens, q_heads, kv_heads, 64, dtype, block_size)
    q = random_q(len(lens), qc.case).to(q_dtype)
    out = reference.paged_decode_attention(q, *qc.args, qc.case.seq_lens, qc.case.scale,
                                           k_scale=qc.k_scale, v_scale=qc.v_scale)
    _check(out, q, decode_oracle(q, qc.deq), decode_oracle(q, qc.case), dtype, q_dtype)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=["q32", "qbf16"])
@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize(("q_lens", "lens", "q_heads", "kv_heads", "block_size"), PREFILL)
def test_reference_prefill_on_quantized_pages(q_lens, lens, q_heads, kv_heads, block_size,
                                              dtype, q_dtype):
    qc = make_qcase(lens, q_heads, kv_heads, 64, dtype, block_size)
    q = random_q(sum(q_lens), qc.case).to(q_dtype)
    out = reference.paged_prefill_attention(
        q, *qc.args, cu_seqlens(q_lens, "cpu"), qc.case.seq_lens, qc.case.scale,
        k_scale=qc.k_scale, v_scale=qc.v_scale)
    _check(out, q, prefill_oracle(q, qc.deq, q_lens), prefill_oracle(q, qc.case, q_lens),
           dtype, q_dtype)


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize(("lens", "q_heads", "kv_heads", "block_size"), DECODE[1:3])
def test_triton_decode_on_quantized_pages(lens, q_heads, kv_heads, block_size, dtype):
    ta = _attention("triton")
    qc = make_qcase(lens, q_heads, kv_heads, 64, dtype, block_size)
    q = random_q(len(lens), qc.case)
    for splits in (1, 3):
        out = ta.paged_decode_attention(q, *qc.args, qc.case.seq_lens, qc.case.scale,
                                        num_splits=splits, k_scale=qc.k_scale,
                                        v_scale=qc.v_scale)
        _check(out, q, decode_oracle(q, qc.deq), decode_oracle(q, qc.case), dtype,
               torch.float32)


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize(("q_lens", "lens", "q_heads", "kv_heads", "block_size"),
                         [PREFILL[1], PREFILL[3]])
def test_triton_prefill_on_quantized_pages(q_lens, lens, q_heads, kv_heads, block_size, dtype):
    ta = _attention("triton")
    qc = make_qcase(lens, q_heads, kv_heads, 64, dtype, block_size)
    q = random_q(sum(q_lens), qc.case)
    out = ta.paged_prefill_attention(
        q, *qc.args, cu_seqlens(q_lens, "cpu"), qc.case.seq_lens, qc.case.scale,
        k_scale=qc.k_scale, v_scale=qc.v_scale)
    _check(out, q, prefill_oracle(q, qc.deq, q_lens), prefill_oracle(q, qc.case, q_lens),
           dtype, torch.float32)


def test_dispatch_forced_triton_matches_reference_on_quantized_pages(monkeypatch):
    """KVGATE_FORCE_TRITON=1 sends the quantized store and attention to Triton (the
    interpreter here), which agree with the torch path."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the tests use CUDA tensors; forcing is for CPU machines")
    _triton("triton_attention")
    _triton("triton_store")
    qc = make_qcase([20, 9], 4, 2, 32, FP8, 8)
    q = random_q(2, qc.case)
    scales = {"k_scale": qc.k_scale, "v_scale": qc.v_scale}
    want = kernels.paged_decode_attention(q, *qc.args, qc.case.seq_lens, qc.case.scale,
                                          **scales)
    monkeypatch.setenv("KVGATE_FORCE_TRITON", "1")
    got = kernels.paged_decode_attention(q, *qc.args, qc.case.seq_lens, qc.case.scale, **scales)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    before = qc.pool.clone()
    k = torch.randn(2, 2, 32) * 5
    slots = torch.tensor([int(qc.case.block_tables[0, 2]) * 8 + 4, -1])
    kernels.store_kv(k, k, *qc.layout.layer_kv(qc.pool, 1), slots, **scales)
    monkeypatch.delenv("KVGATE_FORCE_TRITON")
    kernels.store_kv(k, k, *qc.layout.layer_kv(before, 1), slots,
                     *qc.layout.layer_scales(before, 1))
    assert torch.equal(qc.pool, before)
