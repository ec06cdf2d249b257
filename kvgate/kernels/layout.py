"""The page layout: the one place in the code that says how a KV page is laid out.

A page holds one block of ``block_size`` tokens for *every* layer, so moving a block
between tiers is one contiguous copy:

    page  = [num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]
    pool  = [num_pages, *page]

Attention for one layer reads strided views of the pool (``layer_kv``), shaped
``[num_pages, block_size, num_kv_heads, head_dim]``; kernels take their strides, so the
views need not be contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def page_numel(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def page_bytes(self) -> int:
        return self.page_numel * torch.empty((), dtype=self.dtype).element_size()

    def pages_for_bytes(self, nbytes: int) -> int:
        """How many whole pages fit in ``nbytes`` (configuration gives pool sizes in bytes)."""
        return max(0, int(nbytes) // self.page_bytes)

    def pool_shape(self, num_pages: int) -> tuple[int, ...]:
        return (num_pages, *self.page_shape)

    def allocate_pool(
        self, num_pages: int, device: torch.device | str = "cpu", pin_memory: bool = False
    ) -> torch.Tensor:
        """A zeroed pool of ``num_pages`` pages; ``pin_memory`` only takes effect with CUDA."""
        pin = bool(pin_memory) and torch.cuda.is_available() and torch.device(device).type == "cpu"
        return torch.zeros(self.pool_shape(num_pages), dtype=self.dtype, device=device, pin_memory=pin)

    @staticmethod
    def layer_kv(pool: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided K and V views of one layer: each ``[num_pages, block_size, kv_heads, head_dim]``."""
        return pool[:, layer, 0], pool[:, layer, 1]
