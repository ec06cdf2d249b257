"""Page pools: the memory of one tier and which of its pages are free.

A pool is bookkeeping only (a tensor and a free list); what a used page holds and when it
may go is the index's and the policy's business (vLLM v1 keeps the same split).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from kvgate.kernels import copy_pages as kernel_copy_pages
from kvgate.kernels.layout import KVLayout, convert_pages


class PagePool:
    """``num_pages`` pages of one tier, laid out by ``KVLayout``; pages are ints."""

    def __init__(
        self, layout: KVLayout, num_pages: int, device: torch.device | str, pin_memory: bool
    ) -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.tensor = layout.allocate_pool(num_pages, device=device, pin_memory=pin_memory)
        self._free: deque[int] = deque(range(num_pages))
        self._is_free = [True] * num_pages
        self._owner: list[str] = [""] * num_pages
        self.held: dict[str, int] = {}  # namespace -> pages it holds (what shares count)

    @property
    def page_bytes(self) -> int:
        return self.layout.page_bytes

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def take(self, owner: str = "") -> int:
        """A free page, held by namespace ``owner``; the caller made sure one exists."""
        page = self._free.popleft()
        self._is_free[page] = False
        self._owner[page] = owner
        self.held[owner] = self.held.get(owner, 0) + 1
        return page

    def give_back(self, page: int) -> None:
        if self._is_free[page]:
            raise RuntimeError(f"page {page} freed twice")
        self._is_free[page] = True
        self._free.append(page)
        owner = self._owner[page]
        self.held[owner] -= 1
        if not self.held[owner]:
            del self.held[owner]


def move_pages(
    src: PagePool, dst: PagePool, src_pages: Sequence[int], dst_pages: Sequence[int]
) -> None:
    """Copy whole pages between two tiers' pools; when their layouts differ (a host tier
    of another KV dtype, ``--offload-kv-dtype``), each page is converted on the way.

    A conversion is done on the faster side (on the GPU when either pool is there) and
    is synchronous; pages of one layout go through ``copy_pages``.
    """
    if src.layout == dst.layout:
        copy_pages(src.tensor, dst.tensor, src_pages, dst_pages)
        return
    if not src_pages:
        return
    rows = src.tensor.index_select(0, torch.tensor(list(src_pages), device=src.tensor.device))
    if dst.tensor.is_cuda and not rows.is_cuda:
        rows = rows.to(dst.tensor.device)
    rows = convert_pages(src.layout, dst.layout, rows).to(dst.tensor.device)
    dst.tensor.index_copy_(0, torch.tensor(list(dst_pages), device=dst.tensor.device), rows)


def copy_pages(
    src: torch.Tensor, dst: torch.Tensor, src_pages: Sequence[int], dst_pages: Sequence[int]
) -> None:
    """Copy whole pages ``src[src_pages[i]] → dst[dst_pages[i]]``: every tier move goes here.

    On CUDA the kernels layer's copy runs on its own stream; the current stream waits on
    its event, so later reads and overwrites of the pages are ordered after the copy while
    the host thread goes on. Between CPU pools the copy is done when this returns.
    """
    if not src_pages:
        return
    event = kernel_copy_pages(src, dst, src_pages, dst_pages)
    if event is not None:
        torch.cuda.current_stream(src.device if src.is_cuda else dst.device).wait_event(event)
