"""Triton paged attention: prefill over a cached prefix, and split-KV decode.

Both kernels find K/V through the block table one tile of ``BLOCK_N`` tokens at a time:
token ``n`` of a sequence lives at ``(block_table[n // block_size], n % block_size)``, so a
tile may span several pages and the page size need not match the tile. Softmax is online
(running max and sum, base 2), accumulated in fp32 whatever the storage dtype.

``UPCAST`` converts the operands to fp32 before the dot products. It is on under
``TRITON_INTERPRET=1``, whose bf16 arithmetic is wrong, and for fp32 inputs (TF32x3 on a
GPU: fp32 accuracy, no plain-TF32 rounding); on a GPU, fp16/bf16 run their dots on tensor
cores with an fp32 accumulator.

Quantized pages (``QUANT``: fp8 e4m3 or int8 values, an fp32 scale per page and KV head)
are read as they are stored and converted to the dot's dtype (exact for both: e4m3 and
int8 values fit bf16/fp16); the scales are applied where they cost least: K's to the
scores' columns, V's to the probabilities' columns before the second dot.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile_scores(q, k_tile, scale_log2, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        s = tl.dot(q, tl.trans(k_tile.to(tl.float32)), input_precision=PRECISION)
    else:
        s = tl.dot(q, tl.trans(k_tile))
    return s * scale_log2


@triton.jit
def _tile_update(acc, p, v_tile, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        acc += tl.dot(p, v_tile.to(tl.float32), input_precision=PRECISION)
    else:
        acc += tl.dot(p.to(v_tile.dtype), v_tile)
    return acc


@triton.jit
def _load_kv_tile(cache_ptr, table_row_ptr, n, n_mask, kv_head, d, d_mask,
                  stride_p, stride_o, stride_h, BLOCK_SIZE: tl.constexpr):
    page = tl.load(table_row_ptr + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    ptrs = (cache_ptr + page[:, None] * stride_p + (n % BLOCK_SIZE)[:, None] * stride_o
            + kv_head * stride_h + d[None, :])
    return tl.load(ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _tile_scale(scale_ptr, table_row_ptr, n, n_mask, kv_head, stride_p, stride_h,
                BLOCK_SIZE: tl.constexpr):
    """The scale of each key's page (for ``kv_head``): ``[BLOCK_N]``, 0 where masked."""
    page = tl.load(table_row_ptr + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    return tl.load(scale_ptr + page * stride_p + kv_head * stride_h, mask=n_mask, other=0.0)


@triton.jit
def _attend_tile(q, k, v, m, denom, acc, keep, scale_log2, k_scale_ptr, v_scale_ptr,
                 table_row, n, n_mask, kv_head, stride_ksp, stride_ksh, stride_vsp,
                 stride_vsh, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One K/V tile into the online softmax: ``keep`` masks scores, (m, denom, acc) carry."""
    if QUANT:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = _tile_scores(q, k, scale_log2, UPCAST, PRECISION)
    if QUANT:
        s = s * _tile_scale(k_scale_ptr, table_row, n, n_mask, kv_head, stride_ksp,
                            stride_ksh, BLOCK_SIZE)[None, :]
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    denom = denom * alpha + tl.sum(p, 1)
    if QUANT:
        p = p * _tile_scale(v_scale_ptr, table_row, n, n_mask, kv_head, stride_vsp,
                            stride_vsh, BLOCK_SIZE)[None, :]
    acc = _tile_update(acc * alpha[:, None], p, v, UPCAST, PRECISION)
    return m_new, denom, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table_ptr, lens_ptr, out_ptr,
    part_acc_ptr, part_ml_ptr, scale_log2, partition,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kp, stride_ko, stride_kh, stride_vp, stride_vo, stride_vh, stride_tb,
    stride_ksp, stride_ksh, stride_vsp, stride_vsh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (sequence, KV head, split): every query head of the GQA group shares each K/V load."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    start = split * partition
    end = tl.minimum(start + partition, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = table_ptr + b * stride_tb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        k = _load_kv_tile(k_ptr, table_row, n, n_mask, kv_head, d, d_mask,
                          stride_kp, stride_ko, stride_kh, BLOCK_SIZE)
        v = _load_kv_tile(v_ptr, table_row, n, n_mask, kv_head, d, d_mask,
                          stride_vp, stride_vo, stride_vh, BLOCK_SIZE)
        m, denom, acc = _attend_tile(
            q, k, v, m, denom, acc, n_mask[None, :], scale_log2, k_scale_ptr, v_scale_ptr,
            table_row, n, n_mask, kv_head, stride_ksp, stride_ksh, stride_vsp, stride_vsh,
            BLOCK_SIZE, QUANT, UPCAST, PRECISION)

    out_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Unnormalised partials, laid out [B, H, NUM_SPLITS, ...]; the reduce kernel merges.
        row = (b * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + row * 2, m, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, denom, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits of one (sequence, head): rescale each to the common max, then normalise."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    row = (b * NUM_HEADS + h) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    denom = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :],
                  mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # an empty sequence: all splits empty
    w = tl.where(denom > 0, tl.exp2(m - m_all), 0.0)
    total = tl.sum(denom * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table_ptr, cu_ptr, lens_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ko, stride_kh, stride_vp, stride_vo, stride_vh, stride_tb,
    stride_ksp, stride_ksh, stride_vsp, stride_vsh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``TOKENS`` new tokens of one sequence × the ``GROUP`` query heads of one KV head.

    The tile's rows are (token, head) pairs, so each K/V tile is loaded once for the whole
    GQA group: a long cached prefix is read once per KV head, not once per query head.
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if tile * TOKENS >= q_len:
        return
    length = tl.load(lens_ptr + b)
    context = length - q_len  # cached tokens before the first new one

    r = tl.arange(0, BLOCK_M)
    i = tile * TOKENS + r // GROUP  # token index within the sequence's new tokens
    head = kv_head * GROUP + r % GROUP
    d = tl.arange(0, BLOCK_D)
    r_mask = (r < TOKENS * GROUP) & (i < q_len)
    d_mask = d < HEAD_DIM
    pos = context + i  # absolute position of each row's token
    tokens = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = table_ptr + b * stride_tb
    kv_end = tl.minimum(context + (tile + 1) * TOKENS, length)  # the tile's last key + 1
    for n0 in range(0, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < kv_end
        k = _load_kv_tile(k_ptr, table_row, n, n_mask, kv_head, d, d_mask,
                          stride_kp, stride_ko, stride_kh, BLOCK_SIZE)
        v = _load_kv_tile(v_ptr, table_row, n, n_mask, kv_head, d, d_mask,
                          stride_vp, stride_vo, stride_vh, BLOCK_SIZE)
        m, denom, acc = _attend_tile(
            q, k, v, m, denom, acc, n_mask[None, :] & (n[None, :] <= pos[:, None]),
            scale_log2, k_scale_ptr, v_scale_ptr, table_row, n, n_mask, kv_head,
            stride_ksp, stride_ksh, stride_vsp, stride_vsh, BLOCK_SIZE, QUANT, UPCAST, PRECISION)

    out = acc / denom[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def _block_n(head_dim: int) -> int:
    """Keys per tile: smaller for wider heads, so K/V tiles stay in registers without spilling."""
    return 16 if _interpreted() else 64 if head_dim <= 64 else 32 if head_dim <= 128 else 16


def _precision(dtype: torch.dtype) -> dict:
    """fp32 operands under the interpreter (its bf16 math is wrong) and for fp32 inputs.

    On the GPU, fp32 dots run as TF32x3 (fp32 accuracy on tensor cores; plain IEEE fp32
    dots spill registers); fp16/bf16 dots run natively with an fp32 accumulator.
    """
    interp = _interpreted()
    return {"UPCAST": interp or dtype == torch.float32, "PRECISION": "ieee" if interp else "tf32x3"}


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The GQA group size, after checking what the kernels assume about the inputs."""
    if q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of kv heads ({k_cache.shape[2]})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged attention: the cache's head_dim must be contiguous (stride 1)")
    return q.shape[-2] // k_cache.shape[2]


def _scales(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
            unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale views of a quantized cache (``[num_pages, kv_heads]`` fp32, strided), or
    a stand-in pointer the kernel never reads."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("paged attention: give both k_scale and v_scale, or neither")
    return (k_scale, v_scale) if k_scale is not None and v_scale is not None else (unused, unused)


def _scale_strides(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
                   ) -> tuple[int, int, int, int]:
    if k_scale is None or v_scale is None:
        return (0, 0, 0, 0)
    return (k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(batch: int, kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits of the KV length to give the GPU ~4 programs per SM, each >= 256 keys."""
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4  # the interpreter: a few splits, so the reduce path is exercised
    by_work = triton.cdiv(max_len, max(256, block_n))
    return max(1, min(int(triton.cdiv(target, max(1, batch * kv_heads))), int(by_work), 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``max_seq_len`` bounds the lengths (default: the block table's width, so no sync)."""
    group = _check(q, k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q is
    if batch == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    table = block_tables.to(device=q.device, dtype=torch.int32)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    if max_seq_len is None:
        max_seq_len = table.shape[1] * block_size
    max_seq_len = max(1, max_seq_len)
    block_n = _block_n(head_dim)
    splits = num_splits or _num_splits(batch, kv_heads, max_seq_len, block_n, q.device)
    partition = triton.cdiv(triton.cdiv(max_seq_len, splits), block_n) * block_n
    splits = triton.cdiv(max_seq_len, partition)
    if splits > 1:
        part_acc = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, num_heads, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, *_scales(k_scale, v_scale, out), table, lens, out, part_acc,
        part_ml, scale * LOG2E, partition,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0),
        *_scale_strides(k_scale, v_scale), QUANT=k_scale is not None, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        **_precision(q.dtype), num_warps=4, num_stages=1,
    )
    if splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )
    return out


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
    """``max_seqlen_q`` sizes the grid; without it, it is read from ``cu_seqlens_q`` (a sync)."""
    group = _check(q, k_cache, v_cache)
    num_tokens, _, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q is
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    cu = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu[1:] - cu[:-1]).max())
    table = block_tables.to(device=q.device, dtype=torch.int32)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    # Rows per tile (tokens x group heads); fp32 dots need more registers, so fewer rows.
    rows = 16 if _interpreted() else 32 if q.dtype == torch.float32 else 64
    block_m = max(rows, triton.next_power_of_2(group))
    tokens = block_m // group
    grid = (triton.cdiv(max(1, max_seqlen_q), tokens), batch, k_cache.shape[2])
    _prefill_kernel[grid](
        q, k_cache, v_cache, *_scales(k_scale, v_scale, out), table, cu, lens, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0),
        *_scale_strides(k_scale, v_scale), QUANT=k_scale is not None, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], TOKENS=tokens,
        BLOCK_M=block_m, BLOCK_N=_block_n(head_dim),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        **_precision(q.dtype), num_warps=4 if head_dim <= 64 else 8, num_stages=1,
    )
    return out
