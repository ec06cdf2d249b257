"""Random packed batches (hypothesis): any mix of prefix and new lengths, page sizes, GQA.

The attention implementations must agree with the contiguous fp32 oracle on every batch
the engine can build, not only on the hand-picked cases.
"""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.kernels import reference
from tests.kernels.paged import cu_seqlens, decode_oracle, make_case, prefill_oracle, random_q


@st.composite
def batches(draw, max_seqs: int, max_len: int):
    n = draw(st.integers(1, max_seqs))
    q_lens = draw(st.lists(st.integers(1, max_len), min_size=n, max_size=n))
    prefixes = draw(st.lists(st.integers(0, max_len), min_size=n, max_size=n))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    block_size = draw(st.sampled_from([4, 8, 16]))
    head_dim = draw(st.sampled_from([16, 64]))
    seed = draw(st.integers(0, 2**16))
    return q_lens, [q + p for q, p in zip(q_lens, prefixes, strict=True)], kv_heads, group, \
        block_size, head_dim, seed


def _check(mod, batch, device) -> None:
    q_lens, seq_lens, kv_heads, group, block_size, head_dim, seed = batch
    case = make_case(seq_lens, kv_heads * group, kv_heads, head_dim, torch.float32, device,
                     block_size=block_size, seed=seed)
    q = random_q(sum(q_lens), case, seed=seed + 1)
    args = (case.k_cache, case.v_cache, case.block_tables)
    out = mod.paged_prefill_attention(q, *args, cu_seqlens(q_lens, device), case.seq_lens, case.scale)
    torch.testing.assert_close(out, prefill_oracle(q, case, q_lens), atol=2e-5, rtol=0)
    last = q[cu_seqlens(q_lens, device)[1:] - 1]
    out = mod.paged_decode_attention(last, *args, case.seq_lens, case.scale)
    torch.testing.assert_close(out, decode_oracle(last, case), atol=2e-5, rtol=0)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batch=batches(max_seqs=5, max_len=40))
def test_reference_on_random_batches(batch):
    _check(reference, batch, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(batch=batches(max_seqs=3, max_len=20))
def test_triton_on_random_batches(batch):
    pytest.importorskip("triton")
    ta = importlib.import_module("kvgate.kernels.triton_attention")
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(ta._decode_kernel, InterpretedFunction):
            pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set")
    _check(ta, batch, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
