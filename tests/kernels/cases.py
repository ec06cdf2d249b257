"""The shapes every attention implementation is checked on (shared by the test modules)."""

import pytest
import torch

# (q_lens, seq_lens): new tokens per sequence, and total KV length including them.
PREFILL_CASES = {
    "no_prefix": ([19], [19]),
    "one_token": ([1], [1]),
    "prefix_and_tail": ([5], [37]),
    "prefix_only_one_new": ([1], [33]),
    "block_multiple": ([16], [32]),
    "mixed": ([3, 16, 1, 9], [3, 40, 17, 41]),
}

DECODE_CASES = {
    "one_token": [1],
    "single": [37],
    "block_multiple": [32],
    "mixed": [1, 17, 50, 16, 3],
}

# (q_heads, kv_heads): GQA ratios 1, 4, 8.
GQA = [(2, 2), (4, 1), (8, 1)]

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
