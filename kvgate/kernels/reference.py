"""Torch implementations of the kernels: the CPU path the engine runs, and the test oracle.

They are written for speed on CPU, not for line-by-line resemblance to the Triton kernels:
each sequence's pages are gathered with one ``index_select`` into contiguous K/V and handed
to ``scaled_dot_product_attention``, which runs a fused kernel (fp32 accumulation for
half types). Shapes and semantics are those of ``docs/architecture.md`` (section kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvgate.kernels.layout import dequantize, grown_scale, quantize, scale_for


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write token ``t`` into slot ``slot_mapping[t]``; ``-1`` marks padding to skip.

    ``k_cache`` / ``v_cache`` are usually strided views of the pool, so this writes with
    ``index_put_`` through the view instead of reshaping (which would copy). Quantized
    caches come with their scale views ``[num_pages, kv_heads]`` (``store_quantized``).
    """
    block_size = k_cache.shape[1]
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    pages = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - pages * block_size
    if k_scale is not None and v_scale is not None:
        if slots.numel():
            store_quantized(k, v, k_cache, v_cache, k_scale, v_scale, pages, offsets)
        return
    k_cache.index_put_((pages, offsets), k.to(k_cache.dtype))
    v_cache.index_put_((pages, offsets), v.to(v_cache.dtype))


def store_quantized(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_scale: torch.Tensor, v_scale: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor,
) -> None:
    """New tokens into quantized pages, each page's scales grown to cover them.

    Per (page, KV head), K and V apart: the new tokens' amax gives the scale they need; a
    page whose slot 0 is written starts over from scale 0 (pages are reused), and
    ``layout.grown_scale`` gives the page's new scale, by which its existing values are
    re-quantized before the new tokens are written. Every page touched is rewritten whole
    (a block per head), which on a CPU costs less than finding the ones that grew.
    """
    used, inverse = torch.unique(pages, return_inverse=True)
    reset = torch.zeros(used.shape[0], dtype=torch.bool, device=pages.device)
    reset.index_fill_(0, inverse[offsets == 0], True)
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        dtype = cache.dtype
        amax = x.abs().amax(-1).float()  # [T, kv_heads]
        need = amax.new_zeros(used.shape[0], amax.shape[1]).scatter_reduce_(
            0, inverse[:, None].expand_as(amax), amax, "amax")
        old = torch.where(reset[:, None], 0.0, scales.index_select(0, used))
        new = grown_scale(old, scale_for(need, dtype))
        # new / old: a power of two, or inf / nan for an empty page (its values become 0)
        block = quantize(cache.index_select(0, used), (new / old)[:, None, :, None], dtype)
        block[inverse, offsets] = quantize(x, new[inverse][:, :, None], dtype)
        cache[used] = block
        scales[used] = new


def gather_pages(
    cache: torch.Tensor, pages: torch.Tensor, scales: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``cache[pages]`` as a new contiguous tensor ``[len(pages), block_size, kv_heads, D]``;
    a quantized cache's values are dequantized with its ``scales`` into ``dtype``.

    One layer's block inside a page is contiguous, so the view is flattened to one row per
    page first: ``index_select`` then copies whole rows, which is many times faster than
    gathering from the 4-d strided view.
    """
    pages = pages.to(device=cache.device, dtype=torch.long)
    try:
        rows = cache.view(cache.shape[0], -1)
        out = rows.index_select(0, pages).view(-1, *cache.shape[1:])
    except RuntimeError:  # a view whose blocks are not contiguous: gather it as it is
        out = cache.index_select(0, pages)
    if scales is None:
        return out
    return dequantize(out, scales.index_select(0, pages)[:, None, :, None],
                      dtype or torch.float32)


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, length: int,
    scales: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, contiguous: ``[length, kv_heads, D]``
    (dequantized into ``dtype`` when ``scales`` are given)."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return gather_pages(cache, block_table[:num_blocks], scales, dtype).flatten(0, 1)[:length]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """SDPA over ``q: [H, M, D]``, ``k, v: [kvh, N, D]``; GQA by head grouping.

    The batch dimension of one is added because 3-d inputs miss the CPU's fused kernel.
    """
    return F.scaled_dot_product_attention(
        q[None], k.to(q.dtype)[None], v.to(q.dtype)[None], attn_mask=mask, is_causal=causal,
        scale=scale, enable_gqa=q.shape[0] != k.shape[0],
    )[0]


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    Sequences are attended one at a time: a packed batch usually has few prefill sequences,
    and a padded batch would waste the work of its longest member on every other one.
    """
    del max_seqlen_q  # only the Triton path needs it (to size its grid without a sync)
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, total in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], total, k_scale, q.dtype).transpose(0, 1)
        v = gather_kv(v_cache, block_tables[b], total, v_scale, q.dtype).transpose(0, 1)
        qb = q[start:end].transpose(0, 1)
        if q_len == total:
            o = _attend(qb, k, v, scale, None, causal=True)
        else:
            # New token j sits at position total - q_len + j and sees keys 0 ..= position.
            pos = torch.arange(total - q_len, total, device=q.device)
            mask = torch.arange(total, device=q.device)[None, :] <= pos[:, None]
            o = _attend(qb, k, v, scale, mask, causal=False)
        out[start:end] = o.transpose(0, 1)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over all of its keys, as one padded batch.

    Decode batches are many short calls, so one gather and one SDPA call for the whole
    batch beat a Python loop; keys past a sequence's length are masked out. Unused
    block-table entries may hold anything, so they are replaced by page 0 before the
    gather. A sequence of length 0 (batch padding) gets a zero output.
    """
    del max_seq_len  # only the Triton path needs it (to size its grid without a sync)
    batch = q.shape[0]
    if batch == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    block_size = k_cache.shape[1]
    lens = seq_lens.to(device=q.device, dtype=torch.long)
    min_len, max_len = (int(x) for x in torch.aminmax(lens))
    if max_len == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    num_blocks = -(-max_len // block_size)
    table = block_tables[:, :num_blocks].to(device=q.device, dtype=torch.long)
    if min_len == max_len:  # every sequence as long (batch 1 always): every entry used
        pages = table.flatten()
    else:
        used = torch.arange(num_blocks, device=q.device)[None, :] * block_size < lens[:, None]
        pages = torch.where(used, table, 0).flatten()
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    shape = (batch, num_blocks * block_size, kv_heads, head_dim)
    k = gather_pages(k_cache, pages, k_scale, q.dtype).view(shape)[:, :max_len].transpose(1, 2)
    v = gather_pages(v_cache, pages, v_scale, q.dtype).view(shape)[:, :max_len].transpose(1, 2)
    # No mask when no key is past its sequence's end: SDPA's unmasked path is the fast one.
    mask = None if min_len == max_len else (
        torch.arange(max_len, device=q.device)[None, :] < lens.clamp(min=1)[:, None]
    )[:, None, None, :]
    # GQA folded into the query length: each KV head's group of query heads is one
    # [group, D] query block, so K/V are read once per KV head (several times faster on
    # CPU than enable_gqa for a single query token).
    group = q.shape[1] // kv_heads
    o = F.scaled_dot_product_attention(
        q.reshape(batch, kv_heads, group, head_dim), k.to(q.dtype), v.to(q.dtype),
        attn_mask=mask, scale=scale,
    ).reshape(q.shape)
    if min_len > 0:
        return o
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    live = lens > 0
    out[live] = o[live]
    return out


def copy_pages(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    src_pages: torch.Tensor,
    dst_pages: torch.Tensor,
) -> None:
    """Copy whole pages ``src_pool[src_pages[i]] -> dst_pool[dst_pages[i]]`` synchronously."""
    src = torch.as_tensor(src_pages, dtype=torch.long, device=src_pool.device)
    dst = torch.as_tensor(dst_pages, dtype=torch.long, device=dst_pool.device)
    if src.numel() == 0:
        return
    dst_pool.index_copy_(0, dst, src_pool.index_select(0, src).to(dst_pool.device))


@dataclass
class PoolRows:
    """One step's addresses in a contiguous pool, computed once and used by every layer.

    The per-layer path above re-derives pages, offsets and masks from the step's tensors in
    each of the model's layers: a dozen small ops per layer, which at batch 1 on a CPU cost
    more than the attention itself. Here the step's rows are computed once, for layer 0; a
    layer's rows are the same numbers in the pool's flat view shifted by the layer
    (``layer * 2 * block_size`` token rows), so a layer's store is one ``index_copy_`` and
    its decode gather one ``index_select`` straight into the ``[B, kv_heads, L, D]`` layout
    SDPA reads fastest. Only for a contiguous pool (the engine's); the Triton path never
    needs it.
    """

    store: torch.Tensor  # [2T] token rows of the new tokens' K (first T) then V, layer 0
    block_size: int
    kv_heads: int
    gather: torch.Tensor | None = None  # decode: [2, B, kv_heads, L] head rows, layer 0
    mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] keys inside each sequence
    scratch: torch.Tensor | None = None  # decode: where each layer gathers its K/V
    # prefill over cached keys: per sequence (first, end) of its new tokens in the step,
    # its [2, kv_heads, kv_len] head rows, and its [q_len, kv_len] mask (None: causal)
    prefill: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] | None = None


def _head_rows(pages: torch.Tensor, positions: torch.Tensor, layers: int, block_size: int,
               kv_heads: int) -> torch.Tensor:
    """Layer 0's head rows (units of ``D``) of the keys at ``positions`` on ``pages``
    (``[..., L]`` each): ``[2 (k, v), ..., kv_heads, L]``."""
    tok = (pages * (layers * 2 * block_size) + positions % block_size).unsqueeze(-2)
    kv = torch.tensor([0, block_size], device=pages.device).view(2, *[1] * tok.dim())
    heads = torch.arange(kv_heads, device=pages.device)[:, None]
    return (tok + kv) * kv_heads + heads


def _layer_heads(pool: torch.Tensor, layer: int, rows: PoolRows) -> torch.Tensor:
    """The pool as rows of ``D`` from ``layer``'s first head row on: layer 0's row
    numbers address this layer there."""
    return pool.view(-1, pool.shape[-1])[layer * 2 * rows.block_size * rows.kv_heads :]


def pool_rows(
    pool: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    min_len: int = 0,
    max_len: int = 0,
) -> PoolRows:
    """Rows for one step in ``pool`` (``[pages, layers, 2, block, kv_heads, D]``, contiguous).

    ``slot_mapping`` (no padding: every slot ``>= 0``) gives the store rows. For a decode
    step, also pass the block tables, the sequence lengths and their bounds as host ints
    (every length ``>= 1``): that adds the gather rows and, when lengths differ, the mask.
    """
    if not pool.is_contiguous():
        raise ValueError("pool_rows needs a contiguous pool")
    layers, block_size, kv_heads = pool.shape[1], pool.shape[3], pool.shape[4]
    slots = slot_mapping.to(device=pool.device, dtype=torch.long)
    tok = (torch.div(slots, block_size, rounding_mode="floor") * (layers * 2 * block_size)
           + slots % block_size)
    rows = PoolRows(torch.cat([tok, tok + block_size]), block_size, kv_heads)
    if block_tables is None or seq_lens is None or max_len <= 0:
        return rows
    if min_len < 1:
        raise ValueError("pool_rows: every decoding sequence has at least one key")
    lens = seq_lens.to(device=pool.device, dtype=torch.long)
    j = torch.arange(max_len, device=pool.device)
    table = block_tables[:, : -(-max_len // block_size)].to(device=pool.device, dtype=torch.long)
    pages = table[:, j // block_size]  # [B, L]
    if min_len != max_len:  # entries past a sequence's end may hold anything: use page 0
        inside = j[None, :] < lens[:, None]
        pages = torch.where(inside, pages, 0)
        rows.mask = inside[:, None, None, :]
    rows.gather = _head_rows(pages, j, layers, block_size, kv_heads)  # [2, B, kvh, L]
    rows.scratch = pool.new_empty(rows.gather.numel(), pool.shape[-1])
    return rows


def add_prefill_rows(rows: PoolRows, pool: torch.Tensor, block_tables: torch.Tensor,
                     cu_seqlens_q: list[int], seq_lens: list[int]) -> None:
    """Adds to ``rows`` what a prefill step over cached keys reads: each sequence's key rows
    and mask, once for all layers (host lists: no device sync)."""
    layers, block_size, kv_heads = pool.shape[1], pool.shape[3], pool.shape[4]
    rows.prefill = []
    for b, total in enumerate(seq_lens):
        start, end = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        if end == start:
            continue
        j = torch.arange(total, device=pool.device)
        table = block_tables[b, : -(-total // block_size)].to(device=pool.device,
                                                               dtype=torch.long)
        gather = _head_rows(table[j // block_size], j, layers, block_size, kv_heads)
        mask = None
        if end - start != total:  # new token i sits at total - q_len + i: keys 0 ..= it
            first = total - (end - start)
            mask = j[None, :] <= torch.arange(first, total, device=pool.device)[:, None]
        rows.prefill.append((start, end, gather, mask))


def prefill_attention_rows(
    q: torch.Tensor, pool: torch.Tensor, layer: int, rows: PoolRows, scale: float
) -> torch.Tensor:
    """``paged_prefill_attention`` for one layer with the step's precomputed rows: each
    sequence's keys gathered straight into the ``[kv_heads, L, D]`` layout SDPA reads."""
    assert rows.prefill is not None, "add_prefill_rows was not called for this step"
    head_dim = q.shape[-1]
    flat = _layer_heads(pool, layer, rows)
    out = torch.empty_like(q)
    for start, end, gather, mask in rows.prefill:
        kv = flat.index_select(0, gather.flatten()).view(*gather.shape, head_dim)
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None], kv[0][None].to(q.dtype), kv[1][None].to(q.dtype),
            attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=q.shape[1] != rows.kv_heads,
        )
        out[start:end] = o[0].transpose(0, 1)
    return out


def store_kv_rows(
    k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, layer: int, rows: PoolRows
) -> None:
    """``store_kv`` for one layer with the step's precomputed rows: ``k, v: [T, kvh, D]``."""
    flat = pool.view(-1, rows.kv_heads * pool.shape[-1])[layer * 2 * rows.block_size :]
    flat.index_copy_(0, rows.store, torch.cat([k, v]).to(pool.dtype).flatten(1))


def decode_attention_rows(
    q: torch.Tensor, pool: torch.Tensor, layer: int, rows: PoolRows, scale: float
) -> torch.Tensor:
    """``paged_decode_attention`` for one layer with the step's precomputed rows."""
    assert rows.gather is not None, "pool_rows was built without the decode tables"
    batch, q_heads, head_dim = q.shape
    kv = torch.index_select(_layer_heads(pool, layer, rows), 0, rows.gather.flatten(),
                            out=rows.scratch)
    kv = kv.view(*rows.gather.shape, head_dim)
    out = F.scaled_dot_product_attention(
        q.view(batch, q_heads, 1, head_dim), kv[0].to(q.dtype), kv[1].to(q.dtype),
        attn_mask=rows.mask, scale=scale, enable_gqa=q_heads != rows.kv_heads,
    )
    return out.view(batch, q_heads, head_dim)
