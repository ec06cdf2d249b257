"""The page layout: the one place in the code that says how a KV page is laid out.

A page holds one block of ``block_size`` tokens for *every* layer, so moving a block
between tiers is one contiguous copy:

    page  = [num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]
    pool  = [num_pages, *page]

Attention for one layer reads strided views of the pool (``layer_kv``), shaped
``[num_pages, block_size, num_kv_heads, head_dim]``; kernels take their strides, so the
views need not be contiguous.

Quantized pages (``dtype`` fp8 e4m3 or int8) carry their scales inside the page: one fp32
scale per layer, K or V and KV head (per block, per head), after the values. Such a pool
is stored as bytes, ``[num_pages, page_bytes]`` uint8, and read through two views of the
same memory, ``values`` and ``scales``; a page is still one contiguous row, so every tier
move, the remote tier and the disk tier copy it as they copy any page.

    quantized page = values [L, 2, block, kv_heads, D] (1 byte each), then
                     scales [L, 2, kv_heads] (fp32); value x = q * scale
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
QUANTIZED = (FP8, torch.int8)
# the largest magnitude each quantized dtype holds: x / scale is clamped into ±QMAX
QMAX = {FP8: 448.0, torch.int8: 127.0}
SCALE_DTYPE = torch.float32
# KV dtypes by the names flags give them (``--kv-dtype``, ``--offload-kv-dtype``, ``kvgate
# plan --kv-dtype``); ``dtype_name`` is the name stats give a dtype
KV_DTYPES: dict[str, torch.dtype] = {
    "fp8": FP8, "int8": torch.int8, "bf16": torch.bfloat16, "fp16": torch.float16,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # what K/V values are stored as (fp32/bf16/fp16, or fp8/int8)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        """The shape of a page's values."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        """The shape of a quantized page's scales."""
        return (self.num_layers, 2, self.num_kv_heads)

    @property
    def page_numel(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def value_bytes(self) -> int:
        """Bytes of a page's values (a quantized page's are padded to whole fp32 scales)."""
        n = self.page_numel * torch.empty((), dtype=self.dtype).element_size()
        return -(-n // 4) * 4 if self.quantized else n

    @property
    def page_bytes(self) -> int:
        """Bytes of one page, scales included: what every tier's capacity is counted in."""
        scales = self.num_layers * 2 * self.num_kv_heads * 4 if self.quantized else 0
        return self.value_bytes + scales

    @property
    def bytes_per_token(self) -> float:
        return self.page_bytes / self.block_size

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of the pool tensor and of a page moved between tiers."""
        return torch.uint8 if self.quantized else self.dtype

    @property
    def storage_page_shape(self) -> tuple[int, ...]:
        """The shape of one page as the pool stores it."""
        return (self.page_bytes,) if self.quantized else self.page_shape

    def pages_for_bytes(self, nbytes: int) -> int:
        """How many whole pages fit in ``nbytes`` (configuration gives pool sizes in bytes)."""
        return max(0, int(nbytes) // self.page_bytes)

    def pool_shape(self, num_pages: int) -> tuple[int, ...]:
        return (num_pages, *self.storage_page_shape)

    def allocate_pool(
        self, num_pages: int, device: torch.device | str = "cpu", pin_memory: bool = False
    ) -> torch.Tensor:
        """A zeroed pool of ``num_pages`` pages; ``pin_memory`` only takes effect with CUDA."""
        pin = bool(pin_memory) and torch.cuda.is_available() and torch.device(device).type == "cpu"
        return torch.zeros(self.pool_shape(num_pages), dtype=self.storage_dtype, device=device,
                           pin_memory=pin)

    def values(self, pool: torch.Tensor) -> torch.Tensor:
        """The pool's values as ``[num_pages, *page_shape]`` in ``dtype`` (a view)."""
        if not self.quantized:
            return pool
        return pool[:, :self.page_numel].view(self.dtype).view(pool.shape[0], *self.page_shape)

    def scales(self, pool: torch.Tensor) -> torch.Tensor | None:
        """A quantized pool's scales as ``[num_pages, L, 2, kv_heads]`` fp32 (a view); None
        for a pool of plain values."""
        if not self.quantized:
            return None
        raw = pool[:, self.value_bytes:self.page_bytes]
        return raw.view(SCALE_DTYPE).view(pool.shape[0], *self.scale_shape)

    def layer_kv(self, pool: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided K and V views of one layer: each ``[num_pages, block_size, kv_heads, head_dim]``."""
        values = self.values(pool)
        return values[:, layer, 0], values[:, layer, 1]

    def layer_scales(
        self, pool: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Strided K and V scale views of one layer, each ``[num_pages, kv_heads]``; (None,
        None) for a pool of plain values."""
        scales = self.scales(pool)
        if scales is None:
            return None, None
        return scales[:, layer, 0], scales[:, layer, 1]

    def page_from_bytes(self, raw: bytes | bytearray | memoryview) -> torch.Tensor:
        """One page, as the pool stores it, from its bytes (the remote and disk tiers)."""
        page = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if not self.quantized:
            page = page.view(self.dtype)
        return page.reshape(self.storage_page_shape)

    def signature(self) -> str:
        """What two pools must share for a page of one to be read by the other."""
        return f"{self.page_shape}|{self.dtype}"


def dtype_name(dtype: torch.dtype) -> str:
    """``fp8``, ``int8``, ``bfloat16``...: how flags and stats name a KV dtype."""
    return "fp8" if dtype == FP8 else str(dtype).removeprefix("torch.")


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` in ``dtype`` (fp8 e4m3 or int8), clamped to its range; ``scale``
    broadcasts against ``x`` and a zero scale stores zeros."""
    qmax = QMAX[dtype]
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
    y = (x.float() * inv).clamp(-qmax, qmax)
    if dtype == torch.int8:
        y = y.round()
    return y.to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``; ``scale`` broadcasts against ``q``."""
    return (q.float() * scale).to(dtype)


def scale_for(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale that maps an absolute maximum ``amax`` onto the dtype's largest value."""
    return amax.float() / QMAX[dtype]


def convert_pages(src: KVLayout, dst: KVLayout, pages: torch.Tensor) -> torch.Tensor:
    """Pages of layout ``src`` (``[n, *src.storage_page_shape]``) as pages of ``dst``, on the
    same device: values are dequantized to fp32 and requantized, each block and head with
    the scale its own values need. The two layouts must hold the same tokens and heads."""
    if src.page_shape != dst.page_shape:
        raise ValueError(f"pages of shape {src.page_shape} cannot become {dst.page_shape}")
    if src == dst:
        return pages
    values = src.values(pages).float()
    scales = src.scales(pages)
    if scales is not None:  # [n, L, 2, H] → broadcast over block and head_dim
        values = values * scales[:, :, :, None, :, None]
    out = dst.allocate_pool(pages.shape[0], pages.device)
    if not dst.quantized:
        out.copy_(values.to(dst.dtype))
        return out
    amax = values.abs().amax(dim=(3, 5))  # [n, L, 2, H]
    scale = scale_for(amax, dst.dtype)
    dst_scales = dst.scales(out)
    assert dst_scales is not None
    dst_scales.copy_(scale)
    dst.values(out).copy_(quantize(values, scale[:, :, :, None, :, None], dst.dtype))
    return out


def grown_scale(old: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """The scale of a block holding values at scale ``old`` once tokens needing scale
    ``need`` join it (elementwise; ``old == 0``: the block holds nothing yet).

    An empty block takes ``need`` exactly (a block filled by one prefill is quantized at
    its own amax). A block whose scale covers ``need`` keeps it. Otherwise the scale grows
    by the least power of two that covers ``need``, and the block's values are
    re-quantized by that power of two: exact for fp8 (an exponent shift; subnormals
    aside), at most half a step of the new scale for int8. Successive scales of a block
    at least double, so the rounding errors of one value's re-quantizations sum to less
    than the final scale: an int8 value is within one final step of what was stored,
    and the final scale is below twice the block's amax / 127. A growth no power of two up
    to 2**126 covers takes ``need`` itself (what the block held is then below the new
    dtype's resolution).
    """
    ratio = need / old
    mant, exp = torch.frexp(ratio)
    pow2 = torch.ldexp(torch.ones_like(ratio), (exp - (mant == 0.5).int()).clamp(max=126))
    grown = torch.where(need > old, old * pow2, old)
    # a growth past 2**126 (or a ratio that overflowed): the old values are negligible
    # beside the new ones, and the block starts over at the scale they need
    grown = torch.where(grown < need, need, grown)
    return torch.where(old > 0, grown, need)
