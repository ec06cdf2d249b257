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
