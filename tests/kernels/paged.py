"""Random paged batches for the kernel tests, and the contiguous-attention oracle.

Each case keeps every sequence's K/V twice: contiguous (``ks[b]``, ``vs[b]``, what the
oracle reads) and scattered over random pages of a multi-layer pool (what the kernels
read through the block table and ``KVLayout.layer_kv``). Every other page of the pool
holds random values too, so reading a wrong page shows, and unused block-table entries
hold an out-of-range page id, so reading one shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvgate.kernels import KVLayout

UNUSED_PAGE = 1 << 20  # far past the pool: reading it would fault or be garbage

# Absolute tolerance against the fp32 oracle, per storage dtype.
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class PagedCase:
    layout: KVLayout
    pool: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    ks: list[torch.Tensor]
    vs: list[torch.Tensor]
    q_heads: int
    scale: float


def make_case(
    seq_lens: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    block_size: int = 16,
    seed: int = 0,
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    layout = KVLayout(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim,
                      block_size=block_size, dtype=dtype)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_pages = sum(blocks) + 3
    pool = layout.allocate_pool(num_pages, device)
    pool.copy_(torch.randn(pool.shape, generator=gen).to(dtype))
    k_cache, v_cache = layout.layer_kv(pool, 1)
    order = torch.randperm(num_pages, generator=gen).tolist()
    width = max(blocks) + 1
    tables = torch.full((len(seq_lens), width), UNUSED_PAGE, dtype=torch.int32)
    ks, vs = [], []
    for b, n in enumerate(seq_lens):
        pages = [order.pop() for _ in range(blocks[b])]
        tables[b, : blocks[b]] = torch.tensor(pages, dtype=torch.int32)
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype).to(device)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype).to(device)
        for t in range(n):
            k_cache[pages[t // block_size], t % block_size] = k[t]
            v_cache[pages[t // block_size], t % block_size] = v[t]
        ks.append(k)
        vs.append(v)
    return PagedCase(layout, pool, k_cache, v_cache, tables.to(device),
                     torch.tensor(seq_lens, dtype=torch.int32, device=device), ks, vs,
                     q_heads, head_dim**-0.5)


def random_q(num_tokens: int, case: PagedCase, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, case.q_heads, case.layout.head_dim, generator=gen)
    return q.to(case.layout.dtype).to(case.pool.device)


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 SDPA of ``q: [M, H, D]`` (the last M positions) over contiguous ``k, v: [N, kvh, D]``."""
    m, n = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    qh = q.float().transpose(0, 1)
    kh = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - m, n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)


def cu_seqlens(q_lens: list[int], device: torch.device | str) -> torch.Tensor:
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def prefill_oracle(q: torch.Tensor, case: PagedCase, q_lens: list[int]) -> torch.Tensor:
    out, start = [], 0
    for b, n in enumerate(q_lens):
        out.append(oracle(q[start : start + n], case.ks[b], case.vs[b], case.scale))
        start += n
    return torch.cat(out)


def decode_oracle(q: torch.Tensor, case: PagedCase) -> torch.Tensor:
    return torch.cat([oracle(q[b : b + 1], case.ks[b], case.vs[b], case.scale)
                      for b in range(q.shape[0])])
