"""The torch reference (the CPU path, and the oracle for Triton) against plain SDPA.

The oracle is ``scaled_dot_product_attention`` in fp32 over each sequence's K/V laid out
contiguously, with GQA by repeating heads; the reference reads the same K/V through
pages and a block table.
"""

import pytest
import torch

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("q_heads", "kv_heads"), GQA)
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_matches_contiguous_sdpa(name, q_heads, kv_heads, head_dim, dtype, device):
    q_lens, seq_lens = PREFILL_CASES[name]
    case = make_case(seq_lens, q_heads, kv_heads, head_dim, dtype, device)
    q = random_q(sum(q_lens), case)
    out = reference.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, cu_seqlens(q_lens, device),
        case.seq_lens, case.scale,
    )
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), prefill_oracle(q, case, q_lens),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("q_heads", "kv_heads"), GQA)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_contiguous_sdpa(name, q_heads, kv_heads, head_dim, dtype, device):
    case = make_case(DECODE_CASES[name], q_heads, kv_heads, head_dim, dtype, device)
    q = random_q(len(DECODE_CASES[name]), case)
    out = reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale
    )
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), decode_oracle(q, case), atol=ATOL[dtype], rtol=0)


def test_decode_empty_sequence_gives_zeros(device):
    case = make_case([20, 1], 4, 2, 64, torch.float32, device)
    q = random_q(2, case)
    lens = torch.tensor([20, 0], dtype=torch.int32, device=device)
    out = reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, lens, case.scale
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], decode_oracle(q, case)[:1], atol=ATOL[torch.float32], rtol=0)


def test_decode_equals_prefill_of_one_new_token(device):
    """The two paths agree where they overlap: a last token over its whole prefix."""
    lens = [5, 33, 16]
    case = make_case(lens, 8, 2, 64, torch.float32, device)
    q = random_q(3, case)
    dec = reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale
    )
    pre = reference.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, cu_seqlens([1, 1, 1], device),
        case.seq_lens, case.scale,
    )
    torch.testing.assert_close(dec, pre, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_heads", "kv_heads"), GQA)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_step_rows_decode_matches_contiguous_sdpa(name, q_heads, kv_heads, dtype):
    """The engine's CPU path: rows computed once per step, read by each layer (layer 1 of
    the case's pool here; its rows are layer 0's shifted), with unused block-table entries
    holding garbage and sequences of different lengths."""
    lens = DECODE_CASES[name]
    case = make_case(lens, q_heads, kv_heads, 64, dtype)
    q = random_q(len(lens), case)
    slots = torch.tensor([int(case.block_tables[b, (n - 1) // 16]) * 16 + (n - 1) % 16
                          for b, n in enumerate(lens)])
    rows = reference.pool_rows(case.pool, slots, case.block_tables, case.seq_lens,
                               min(lens), max(lens))
    assert (rows.mask is None) == (min(lens) == max(lens))
    out = reference.decode_attention_rows(q, case.pool, 1, rows, case.scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), decode_oracle(q, case), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_rows_store_writes_what_store_kv_writes(dtype):
    """Per layer, the step rows' store leaves the pool exactly as ``store_kv`` does, and
    touches no other layer."""
    case = make_case([40, 7, 16], 4, 2, 64, dtype)
    gen = torch.Generator().manual_seed(3)
    slots = torch.tensor([5, 17, 40, 3 * 16 + 15])
    k = torch.randn(4, 2, 64, generator=gen).to(dtype)
    v = torch.randn(4, 2, 64, generator=gen).to(dtype)
    expect = case.pool.clone()
    reference.store_kv(k, v, *case.layout.layer_kv(expect, 1), slots)
    got = case.pool.clone()
    rows = reference.pool_rows(got, slots)
    assert rows.gather is None
    reference.store_kv_rows(k.transpose(0, 1).transpose(0, 1), v, got, 1, rows)
    assert torch.equal(got, expect)
    with pytest.raises(ValueError, match="contiguous"):
        reference.pool_rows(case.pool[:, :1], slots)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_heads", "kv_heads"), GQA)
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_step_rows_prefill_matches_contiguous_sdpa(name, q_heads, kv_heads, dtype):
    """The engine's CPU path for new tokens over cached keys (and fresh sequences beside
    them): each sequence's rows and mask computed once per step, read by each layer."""
    q_lens, seq_lens = PREFILL_CASES[name]
    case = make_case(seq_lens, q_heads, kv_heads, 64, dtype)
    q = random_q(sum(q_lens), case)
    rows = reference.pool_rows(case.pool, torch.zeros(0, dtype=torch.long))
    reference.add_prefill_rows(rows, case.pool, case.block_tables,
                               cu_seqlens(q_lens, "cpu").tolist(), seq_lens)
    out = reference.prefill_attention_rows(q, case.pool, 1, rows, case.scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), prefill_oracle(q, case, q_lens),
                               atol=ATOL[dtype], rtol=0)
