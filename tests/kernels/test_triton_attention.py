"""Triton paged attention against the contiguous fp32 oracle and the torch reference.

On a machine without CUDA these run in the Triton interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1``), which is slow: the shapes are small, and the full cross product
of options is left to the reference tests, whose oracle is the same.
"""

import importlib

import pytest
import torch

from kvgate import kernels
from kvgate.kernels import reference
from tests.kernels.cases import DECODE_CASES, DTYPES, GQA, PREFILL_CASES
from tests.kernels.paged import (
    ATOL,
    cu_seqlens,
    decode_oracle,
    make_case,
    prefill_oracle,
    random_q,
)

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def ta():
    module = importlib.import_module("kvgate.kernels.triton_attention")
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(module._decode_kernel, InterpretedFunction):
            pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set; "
                        "run tests/kernels on its own")
    return module


def _prefill(ta, q_lens, seq_lens, q_heads, kv_heads, head_dim, dtype, device):
    case = make_case(seq_lens, q_heads, kv_heads, head_dim, dtype, device, seed=len(seq_lens))
    q = random_q(sum(q_lens), case)
    out = ta.paged_prefill_attention(q, case.k_cache, case.v_cache, case.block_tables,
                                     cu_seqlens(q_lens, device), case.seq_lens, case.scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), prefill_oracle(q, case, q_lens),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_cases(ta, name, dtype, device):
    _prefill(ta, *PREFILL_CASES[name], 4, 1, 64, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("q_heads", "kv_heads"), GQA)
def test_prefill_gqa_and_head_dims(ta, q_heads, kv_heads, head_dim, dtype, device):
    _prefill(ta, [5, 2], [21, 2], q_heads, kv_heads, head_dim, dtype, device)


def _decode(ta, seq_lens, q_heads, kv_heads, head_dim, dtype, device, **kw):
    case = make_case(seq_lens, q_heads, kv_heads, head_dim, dtype, device, seed=len(seq_lens))
    q = random_q(len(seq_lens), case)
    out = ta.paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables,
                                    case.seq_lens, case.scale, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), decode_oracle(q, case), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_cases(ta, name, dtype, device):
    _decode(ta, DECODE_CASES[name], 4, 1, 64, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("q_heads", "kv_heads"), GQA)
def test_decode_gqa_and_head_dims(ta, q_heads, kv_heads, head_dim, dtype, device):
    _decode(ta, [9, 30], q_heads, kv_heads, head_dim, dtype, device)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_split_kv(ta, num_splits, device):
    """Splitting the KV length (flash-decoding) changes only the order of the sums."""
    _decode(ta, [150, 3, 64], 8, 2, 64, torch.float32, device, num_splits=num_splits)


def test_decode_empty_sequence_gives_zeros(ta, device):
    case = make_case([40, 1], 4, 2, 64, torch.float32, device)
    q = random_q(2, case)
    lens = torch.tensor([40, 0], dtype=torch.int32, device=device)
    for splits in (1, 3):
        out = ta.paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, lens,
                                        case.scale, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[:1], decode_oracle(q, case)[:1], atol=2e-5, rtol=0)


def test_dispatch_runs_triton_and_agrees_with_reference(ta, device, monkeypatch):
    """The public functions reach Triton (CUDA, or forced on CPU) and match the torch path."""
    if device.type == "cpu":
        monkeypatch.setenv("KVGATE_FORCE_TRITON", "1")
    q_lens, seq_lens = [4, 1], [20, 17]
    case = make_case(seq_lens, 4, 2, 64, torch.float32, device)
    q = random_q(sum(q_lens), case)
    cu = cu_seqlens(q_lens, device)
    args = (case.k_cache, case.v_cache, case.block_tables)
    pre = kernels.paged_prefill_attention(q, *args, cu, case.seq_lens, case.scale)
    dec = kernels.paged_decode_attention(q[cu[1:] - 1], *args, case.seq_lens, case.scale)
    monkeypatch.delenv("KVGATE_FORCE_TRITON", raising=False)
    ref_pre = reference.paged_prefill_attention(q, *args, cu, case.seq_lens, case.scale)
    ref_dec = reference.paged_decode_attention(q[cu[1:] - 1], *args, case.seq_lens, case.scale)
    torch.testing.assert_close(pre, ref_pre, atol=2e-5, rtol=0)
    torch.testing.assert_close(dec, ref_dec, atol=2e-5, rtol=0)
    torch.testing.assert_close(dec, pre[cu[1:] - 1], atol=2e-5, rtol=0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_odd_shapes_and_strided_q(ta, impl, device):
    """Group of 3, head_dim 80, pages of 8 tokens, and a q whose head_dim is not contiguous."""
    mod = reference if impl == "reference" else ta
    q_lens, seq_lens = [6, 1], [30, 9]
    case = make_case(seq_lens, 6, 2, 80, torch.float32, device, block_size=8)
    q = random_q(sum(q_lens), case).transpose(1, 2).contiguous().transpose(1, 2)
    assert q.stride(-1) != 1
    args = (case.k_cache, case.v_cache, case.block_tables)
    pre = mod.paged_prefill_attention(q, *args, cu_seqlens(q_lens, device), case.seq_lens, case.scale)
    torch.testing.assert_close(pre, prefill_oracle(q, case, q_lens), atol=2e-5, rtol=0)
    last = q[[5, 6]]
    dec = mod.paged_decode_attention(last, *args, case.seq_lens, case.scale)
    torch.testing.assert_close(dec, decode_oracle(last, case), atol=2e-5, rtol=0)


def test_decode_with_host_known_max_len(ta, device):
    """A tight ``max_seq_len`` (the engine knows it on the host) sizes the splits; same result."""
    _decode(ta, [70, 5, 33], 4, 2, 64, torch.float32, device, max_seq_len=70)
