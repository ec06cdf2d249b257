"""Whole-page copies between pools: offload (device → host) and promotion (host → device).

A page is contiguous in its pool, and so is any run of consecutive page ids, so on CUDA
the pages are grouped into runs that are consecutive on both sides and each run is one
``cudaMemcpyAsync`` (pinned host memory makes it a true async DMA). Device → device copies
go through one gather/scatter instead, since a kernel beats many small copies there.
The work is queued on a copy stream of its own, after the work already queued on the
caller's stream (so the KV it copies has been written), and the returned event tells the
caller when it is done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvgate.kernels import reference

_copy_streams: dict[int, torch.cuda.Stream] = {}

PageIds = torch.Tensor | Sequence[int]


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The one copy stream per device, made on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _copy_streams:
        _copy_streams[index] = torch.cuda.Stream(device=index)
    return _copy_streams[index]


def contiguous_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, count)`` for each maximal run consecutive in both lists."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def _as_list(pages: PageIds) -> list[int]:
    return pages.tolist() if isinstance(pages, torch.Tensor) else [int(p) for p in pages]


def copy_pages(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    src_pages: PageIds,
    dst_pages: PageIds,
    stream: torch.cuda.Stream | None = None,
) -> torch.cuda.Event | None:
    """Copy ``src_pool[src_pages[i]] → dst_pool[dst_pages[i]]``.

    Returns ``None`` when both pools are on the CPU (the copy is done), else a CUDA event
    recorded on the copy stream after the copy.
    """
    if src_pool.shape[1:] != dst_pool.shape[1:] or src_pool.dtype != dst_pool.dtype:
        raise ValueError(
            f"copy_pages: pools differ: {tuple(src_pool.shape[1:])} {src_pool.dtype} vs "
            f"{tuple(dst_pool.shape[1:])} {dst_pool.dtype}"
        )
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"copy_pages: {len(src_pages)} source pages but {len(dst_pages)} targets")
    cuda = src_pool.device if src_pool.is_cuda else dst_pool.device if dst_pool.is_cuda else None
    if cuda is None:
        src = torch.as_tensor(src_pages, dtype=torch.long)
        dst = torch.as_tensor(dst_pages, dtype=torch.long)
        reference.copy_pages(src_pool, dst_pool, src, dst)
        return None

    stream = stream or copy_stream(cuda)
    stream.wait_stream(torch.cuda.current_stream(cuda))
    with torch.cuda.stream(stream):
        if src_pool.is_cuda and dst_pool.is_cuda:
            src = torch.as_tensor(src_pages, dtype=torch.long).to(cuda, non_blocking=True)
            dst = torch.as_tensor(dst_pages, dtype=torch.long).to(cuda, non_blocking=True)
            if src.numel():
                dst_pool.index_copy_(0, dst, src_pool.index_select(0, src))
        else:
            for s, d, n in contiguous_runs(_as_list(src_pages), _as_list(dst_pages)):
                dst_pool[d : d + n].copy_(src_pool[s : s + n], non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return event
