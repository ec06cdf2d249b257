"""Triton kernel that writes new tokens' K and V into their page slots.

One program per token writes all of its KV heads for both K and V; the cache views are
strided (``KVLayout.layer_kv``), so every address is built from the view's strides, with
the page index widened to int64 because a pool can hold more than 2**31 elements.

Quantized pages (fp8 e4m3 / int8 values with a scale per page, layer, K or V and KV head)
take a second kernel, the twin of ``reference.store_quantized`` bit for bit: one program
per (token, KV head) leads each page, the page's first token in the step (a token whose
predecessor is on the same page returns at once; the others scan the slot mapping), so
tokens may come in any order. The leader finds its page's tokens, takes their amax,
grows the scale (``layout.grown_scale``), re-quantizes the block's other rows and writes
the new ones. Rounding is done in fp32 before the cast (ties to even), so the
interpreter, whose casts round ties away from zero, and the GPU store the same bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvgate.kernels.layout import FP8, QMAX


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcp, stride_kco, stride_kch,
    stride_vcp, stride_vco, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    page = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    kc = k_cache_ptr + page * stride_kcp + offset * stride_kco + h[:, None] * stride_kch + d[None, :]
    vc = v_cache_ptr + page * stride_vcp + offset * stride_vco + h[:, None] * stride_vch + d[None, :]
    # Through fp32: the interpreter rounds half types wrongly when converting directly.
    tl.store(kc, k.to(tl.float32).to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(tl.float32).to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rint(x):
    """Round half to even, exactly (``x - floor(x)`` is exact in fp32)."""
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def _quantize(x, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """``layout.quantize`` in fp32: ``x / scale`` clamped, on the dtype's grid (ties to
    even), so the cast that follows is exact; a scale that is not positive gives 0."""
    pos = scale > 0.0
    inv = tl.where(pos, tl.math.div_rn(1.0, tl.maximum(scale, 1e-30)), 0.0)
    y = tl.minimum(tl.maximum(x * inv, -QMAX), QMAX)
    if IS_FP8:
        # e4m3 keeps 3 mantissa bits; below 2**-6 (subnormals) the step stays 2**-9
        e = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3)
        inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)
        r = _rint(y * inv_step) * step
        return tl.where(r == 0.0, y * 0.0, r)  # a zero keeps its sign, as torch's cast
    return _rint(y)


@triton.jit
def _store_head(src_ptr, cache_ptr, scale_ptr, tok, o, o_mask, d, d_mask, reset,
                stride_st, stride_co, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """K or V of one head of one page: grow its scale over the new rows (``tok[o] >= 0``),
    re-quantize the other rows, write the new ones (``reference.store_quantized``)."""
    new_rows = tok >= 0
    x = tl.load(src_ptr + tok.to(tl.int64)[:, None] * stride_st + d[None, :],
                mask=new_rows[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    need = tl.math.div_rn(tl.max(tl.max(tl.abs(x), 1), 0), QMAX)
    old = tl.where(reset, 0.0, tl.load(scale_ptr))
    has_old = old > 0.0
    # layout.grown_scale: the least power of two 2**k with old * 2**k >= need
    bits = tl.math.div_rn(need, tl.where(has_old, old, 1.0)).to(tl.int32, bitcast=True)
    k = tl.minimum(((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32), 126)
    grown = tl.where(need > old, old * ((k + 127) << 23).to(tl.float32, bitcast=True), old)
    grown = tl.where(grown < need, need, grown)  # past 2**126 or overflowed: start over
    new = tl.where(has_old, grown, need)
    ptrs = cache_ptr + o[:, None] * stride_co + d[None, :]
    # Rows already there are read only when the scale changed: by a power of two, or
    # from 0 (a new block: ratio 0, they quantize to 0).
    redo = tl.where(new != old, (tok < 0) & o_mask, False)
    ratio = tl.where(has_old, tl.math.div_rn(new, tl.where(has_old, old, 1.0)), 0.0)
    q = tl.load(ptrs, mask=redo[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    y = tl.where(new_rows[:, None], _quantize(x, new, QMAX, IS_FP8),
                 _quantize(q, ratio, QMAX, IS_FP8))
    tl.store(ptrs, y.to(cache_ptr.dtype.element_ty),
             mask=(new_rows | redo)[:, None] & d_mask[None, :])
    tl.store(scale_ptr, new)


@triton.jit
def _store_quantized_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kco, stride_kch, stride_vcp, stride_vco, stride_vch,
    stride_ksp, stride_ksh, stride_vsp, stride_vsh,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    page = slot // BLOCK_SIZE
    prev = tl.load(slot_ptr + tl.maximum(t - 1, 0))
    if (t > 0) & (prev >= 0) & (prev // BLOCK_SIZE == page):
        return  # the token before is on this page: not the page's first token
    # One pass over the step's slots: is an earlier token on this page (then another
    # program leads it), and which token goes to each of the page's rows.
    o = tl.arange(0, BLOCK_O)
    tok = tl.full([BLOCK_O], -1, tl.int32)
    earlier = tl.zeros([CHUNK], tl.int32)
    for j0 in range(0, num_tokens, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        s = tl.load(slot_ptr + j, mask=j < num_tokens, other=-1)
        mine = (s >= 0) & (s // BLOCK_SIZE == page)
        earlier = tl.maximum(earlier, (mine & (j < t)).to(tl.int32))
        hit = mine[None, :] & ((s % BLOCK_SIZE)[None, :] == o[:, None])
        tok = tl.maximum(tok, tl.max(tl.where(hit, j[None, :], -1), 1))
    if tl.max(earlier, 0) == 0:
        o_mask = o < BLOCK_SIZE
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        reset = tl.max(tl.where(o == 0, tok, -1), 0) >= 0  # slot 0 written: a new block
        _store_head(k_ptr + h * stride_kh, k_cache_ptr + page * stride_kcp + h * stride_kch,
                    k_scale_ptr + page * stride_ksp + h * stride_ksh, tok, o, o_mask, d,
                    d_mask, reset, stride_kt, stride_kco, QMAX, IS_FP8)
        _store_head(v_ptr + h * stride_vh, v_cache_ptr + page * stride_vcp + h * stride_vch,
                    v_scale_ptr + page * stride_vsp + h * stride_vsh, tok, o, o_mask, d,
                    d_mask, reset, stride_vt, stride_vco, QMAX, IS_FP8)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("store_kv: the cache's head_dim must be contiguous (stride 1)")
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    slots = slot_mapping.to(device=k.device, dtype=torch.int64)
    if k_scale is not None and v_scale is not None:
        block_size = k_cache.shape[1]
        _store_quantized_kernel[(num_tokens, num_heads)](
            k, v, k_cache, v_cache, k_scale, v_scale, slots, num_tokens,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            BLOCK_O=triton.next_power_of_2(block_size),
            BLOCK_D=triton.next_power_of_2(head_dim),
            CHUNK=max(16, min(128, 4096 // triton.next_power_of_2(block_size))),
            QMAX=QMAX[k_cache.dtype], IS_FP8=k_cache.dtype == FP8,
        )
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
