"""Routes a transformers model's attention through our paged KV cache.

transformers calls the registered function once per layer with q/k/v after RoPE as
``[1, heads, T, D]``: the whole step is one packed varlen sequence. The per-step facts
(slot mapping, block tables, sequence lengths) do not fit transformers' signature, so the
runner sets them in a context variable around the forward; the function finds its layer's
pages with ``module.layer_idx``.

The mask function is registered too and returns None: without it transformers would
build a dense [T, T] causal mask for the packed batch (wrong across sequences, and
quadratic memory). Masking is the kernels' job (causal within each sequence).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvgate import kernels
from kvgate.kernels.layout import KVLayout
from kvgate.kernels.reference import (
    PoolRows,
    decode_attention_rows,
    prefill_attention_rows,
    store_kv_rows,
)

ATTN_IMPLEMENTATION = "kvgate_paged"


@dataclass
class AttentionContext:
    kv_pool: torch.Tensor  # the device pool, as ``layout`` stores it
    layout: KVLayout  # how to read it: per-layer K/V views, and scales when quantized
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, KV length including the new tokens
    q_lens: list[int]
    max_seqlen_q: int
    is_decode: bool  # every sequence brings exactly one token
    is_fresh: bool  # no sequence has earlier KV: attention needs only the new K/V
    # the longest KV length, known on the host; None inside a captured graph, where the
    # decode kernel sizes itself to the block table's width (no value may change at replay)
    max_seq_len: int | None = None
    # the torch path's rows for the whole step, computed once (CPU runs; None under Triton)
    rows: PoolRows | None = None


_context: contextvars.ContextVar[AttentionContext | None] = contextvars.ContextVar(
    "kvgate_attention_context", default=None
)


@contextlib.contextmanager
def attention_context(ctx: AttentionContext) -> Iterator[None]:
    token = _context.set(ctx)
    try:
        yield
    finally:
        _context.reset(token)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    ctx = _context.get()
    if ctx is None:
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION} attention runs only inside the engine's runner "
            "(no attention context is set)"
        )
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    layer = getattr(module, "layer_idx", None)  # transformers' attention modules carry it
    if not isinstance(layer, int):
        raise RuntimeError(f"{type(module).__name__} has no integer layer_idx")
    k_cache, v_cache = ctx.layout.layer_kv(ctx.kv_pool, layer)
    k_scale, v_scale = ctx.layout.layer_scales(ctx.kv_pool, layer)  # None unless quantized
    k = key[0].transpose(0, 1)  # [T, kv_heads, D]
    v = value[0].transpose(0, 1)
    rows = ctx.rows
    if rows is not None:
        store_kv_rows(k, v, ctx.kv_pool, layer, rows)
    else:
        kernels.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)

    if ctx.is_fresh:
        # No earlier KV: causal attention over the new K/V alone, sequence by sequence
        # (what vLLM does with flash-attn varlen), with the same fp32-accumulating SDPA.
        # On quantized pages too: only later reads see the stored (dequantized) K/V.
        return _fresh_prefill(query, key, value, ctx.q_lens, scale), None
    q = query[0].transpose(0, 1).contiguous()  # [T, q_heads, D]
    if rows is not None and rows.gather is not None:
        out = decode_attention_rows(q, ctx.kv_pool, layer, rows, scale)
    elif rows is not None and rows.prefill is not None:
        out = prefill_attention_rows(q, ctx.kv_pool, layer, rows, scale)
    elif ctx.is_decode:
        out = kernels.paged_decode_attention(
            q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, scale,
            max_seq_len=ctx.max_seq_len, k_scale=k_scale, v_scale=v_scale,
        )
    else:
        out = kernels.paged_prefill_attention(
            q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.seq_lens, scale,
            max_seqlen_q=ctx.max_seqlen_q, k_scale=k_scale, v_scale=v_scale,
        )
    return out.unsqueeze(0), None  # [1, T, q_heads, D]


def _fresh_prefill(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_lens: list[int], scale: float
) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    outs = []
    start = 0
    for n in q_lens:
        sl = slice(start, start + n)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, sl], key[:, :, sl], value[:, :, sl], is_causal=True, scale=scale,
                enable_gqa=gqa,
            )
        )
        start += n
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)  # [1, T, q_heads, D]


def no_dense_mask(*args: Any, **kwargs: Any) -> None:
    """Mask builder for our implementation: the kernels mask causally per sequence."""
    return None


def register() -> str:
    """Idempotent; returns the name to pass as ``attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, no_dense_mask)
    return ATTN_IMPLEMENTATION
