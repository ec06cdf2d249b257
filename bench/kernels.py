"""Kernel benchmark (GPU only): paged decode attention and page copies against their bounds.

Decode attention is memory-bound, so it is measured as bytes of KV read per second over
the device's measured copy bandwidth (bytes read + written per second by a large
device-to-device copy), and its time beside torch SDPA over contiguous K/V of the same
size, for 16-bit pages and for quantized ones (fp8 e4m3, int8: 1 byte a value plus a
scale per page and head), whose reading is the point of quantizing (about half the bytes
of a 16-bit page). SDPA gets GQA folded into the query length (``[B, kv_heads, group, D]`` against
``[B, kv_heads, L, D]``), so it reads every K/V byte once, like the paged kernel.
Page copies (device → host, host → device, between a device pool and a pinned host pool,
scattered page ids) are measured against one plain contiguous pinned copy of the same bytes.

Goals (issue 3): decode ≥ 80% of copy bandwidth at long context and no slower than SDPA;
page copy ≥ 85% of the plain pinned copy. Issue 27: quantized decode no slower than the
16-bit kernel at long context (it reads half the bytes). Writes ``bench/results/kernels-<gpu>.json``.

Run: ``python -m bench.kernels``. On a machine without CUDA it says so and exits 0; under
``KVGATE_BENCH_SMOKE=1`` it runs the same code there instead, at tiny shapes on the CPU, the
attention in Triton's interpreter when triton is installed (the torch reference if not).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import SMOKE, print_table, smoke, write_result
from kvgate import kernels
from kvgate.kernels import KVLayout
from kvgate.kernels.dispatch import triton_available
from kvgate.kernels.layout import KV_DTYPES, quantize

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # "cpu" only in a smoke run
if SMOKE and not CUDA and triton_available():
    # Before the Triton kernels are defined (on first use): the interpreter runs them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVGATE_FORCE_TRITON", "1")

DTYPE = torch.bfloat16
BLOCK_SIZE = 16
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # a Llama-3-8B layer
DECODE_SHAPES = smoke([(1, 4096), (8, 4096), (32, 2048), (1, 32768), (4, 32768), (16, 16384)],
                      [(1, 64), (2, 40)])
LONG_CONTEXT = smoke(16384, 64)  # decode shapes at or past this length count for the bandwidth goal
# (layers, pages): 2 MiB pages of an 8B model, and 64 KiB pages of a small one.
COPY_SHAPES = smoke([(32, 512), (1, 4096)], [(2, 8), (1, 16)])
WARMUP, ITERS = smoke(3, 1), smoke(20, 2)


def time_ms(fn: Callable[[], object], stream: torch.cuda.Stream | None = None,
            warmup: int = WARMUP, iters: int = ITERS) -> float:
    """Median milliseconds per call, by CUDA events on ``stream`` (default: current); by
    the wall clock on the CPU (smoke runs only)."""
    if not CUDA:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    stream = stream or torch.cuda.current_stream()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def device_copy_bandwidth(nbytes: int = smoke(1 << 30, 1 << 20)) -> float:
    """Bytes moved (read + written) per second by one large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3)


def bench_decode(batch: int, length: int, copy_bw: float, kv_dtype: str = "bf16") -> dict:
    layout = KVLayout(num_layers=2, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      block_size=BLOCK_SIZE, dtype=KV_DTYPES[kv_dtype])
    blocks = -(-length // BLOCK_SIZE)
    pool = layout.allocate_pool(batch * blocks + 1, DEVICE)
    values = layout.values(pool)
    values.copy_(quantize(torch.randn(values.shape, device=DEVICE), torch.ones((), device=DEVICE),
                          layout.dtype) if layout.quantized else torch.randn_like(values))
    if layout.quantized:
        layout.scales(pool).fill_(1.0 / 64)
    k_cache, v_cache = layout.layer_kv(pool, 1)  # strided, as the engine reads them
    k_scale, v_scale = layout.layer_scales(pool, 1)
    tables = torch.randperm(batch * blocks, device=DEVICE).view(batch, blocks).int()
    lens = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    scale = HEAD_DIM**-0.5
    paged_ms = time_ms(lambda: kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, scale, k_scale=k_scale, v_scale=v_scale))

    group = Q_HEADS // KV_HEADS
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    q_folded = q.view(batch, KV_HEADS, group, HEAD_DIM)
    sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(q_folded, k, v, scale=scale))

    # values read, and a quantized page's scales (one fp32 per page, head and K or V)
    kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * values.element_size()
    if layout.quantized:
        kv_bytes += 2 * batch * blocks * KV_HEADS * 4
    bw = kv_bytes / (paged_ms / 1e3)
    return {
        "kv_dtype": kv_dtype, "batch": batch, "context": length, "kv_bytes": kv_bytes,
        "paged_ms": round(paged_ms, 4), "sdpa_contiguous_ms": round(sdpa_ms, 4),
        "kv_read_gb_s": round(bw / 1e9, 1), "fraction_of_copy_bw": round(bw / copy_bw, 3),
        "vs_sdpa": round(sdpa_ms / paged_ms, 3),
    }


def bench_copy(num_layers: int, num_pages: int) -> list[dict]:
    layout = KVLayout(num_layers=num_layers, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      block_size=BLOCK_SIZE, dtype=DTYPE)
    device_pool = layout.allocate_pool(2 * num_pages, DEVICE).normal_()
    host_pool = layout.allocate_pool(2 * num_pages, "cpu", pin_memory=True)
    assert host_pool.is_pinned() or not CUDA
    # Scattered ids, as a real pool's free list gives them: few consecutive runs.
    dev_pages = torch.randperm(2 * num_pages)[:num_pages].tolist()
    host_pages = torch.randperm(2 * num_pages)[:num_pages].tolist()
    nbytes = num_pages * layout.page_bytes
    plain_dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    plain_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=CUDA)
    stream = torch.cuda.Stream() if CUDA else None

    def plain(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], object]:
        def run() -> None:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                dst.copy_(src, non_blocking=True)
        return run

    rows = []
    for direction, src, dst, src_ids, dst_ids, base in (
        ("d2h", device_pool, host_pool, dev_pages, host_pages, plain(plain_host, plain_dev)),
        ("h2d", host_pool, device_pool, host_pages, dev_pages, plain(plain_dev, plain_host)),
    ):
        paged_ms = time_ms(lambda s=src, d=dst, a=src_ids, b=dst_ids:
                           kernels.copy_pages(s, d, a, b, stream=stream), stream=stream)
        plain_ms = time_ms(base, stream=stream)
        rows.append({
            "direction": direction, "page_bytes": layout.page_bytes, "pages": num_pages,
            "bytes": nbytes, "paged_ms": round(paged_ms, 4), "plain_ms": round(plain_ms, 4),
            "paged_gb_s": round(nbytes / paged_ms / 1e6, 2),
            "plain_gb_s": round(nbytes / plain_ms / 1e6, 2),
            "fraction_of_plain": round(plain_ms / paged_ms, 3),
        })
    return rows


def main() -> int:
    if not CUDA and not SMOKE:
        print("bench/kernels.py needs a CUDA GPU (none found): nothing measured.")
        return 0
    torch.manual_seed(0)
    if CUDA:
        gpu = torch.cuda.get_device_name()
    else:
        attention = "Triton interpreter" if os.environ.get("KVGATE_FORCE_TRITON") == "1" \
            else "torch reference"
        gpu = f"cpu (smoke run: {attention}, tiny shapes)"
    copy_bw = device_copy_bandwidth()
    print(f"{gpu}: device copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")

    decode = [bench_decode(b, n, copy_bw) for b, n in DECODE_SHAPES]
    print_table(decode, f"paged decode attention, {DTYPE}, {Q_HEADS}/{KV_HEADS} heads, d={HEAD_DIM}")
    quantized = []
    for kv_dtype in ("fp8", "int8"):
        for row, base in zip((bench_decode(b, n, copy_bw, kv_dtype) for b, n in DECODE_SHAPES),
                             decode, strict=True):
            row["vs_16bit"] = round(base["paged_ms"] / row["paged_ms"], 3)
            quantized.append(row)
    print_table(quantized, f"paged decode attention on quantized pages (q {DTYPE}); "
                           "vs_16bit: the 16-bit kernel's time / this one's")
    copies = [row for layers, pages in COPY_SHAPES for row in bench_copy(layers, pages)]
    print_table(copies, "page copy vs plain contiguous pinned copy")

    long = [r for r in decode if r["context"] >= LONG_CONTEXT]
    long_quantized = [r for r in quantized if r["context"] >= LONG_CONTEXT]
    goals = {
        "decode_bw_ge_80pct_at_long_context": all(r["fraction_of_copy_bw"] >= 0.8 for r in long),
        "decode_not_slower_than_sdpa": all(r["vs_sdpa"] >= 1.0 for r in decode),
        "page_copy_ge_85pct_of_plain": all(r["fraction_of_plain"] >= 0.85 for r in copies),
        "quantized_decode_not_slower_than_16bit_at_long_context": all(
            r["vs_16bit"] >= 1.0 for r in long_quantized),
    }
    print("\ngoals:", ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in goals.items()))

    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if CUDA else "cpu"
    write_result(f"kernels-{slug}", {
        "gpu": gpu, "dtype": str(DTYPE), "device_copy_gb_s": round(copy_bw / 1e9, 1),
        "decode": decode, "decode_quantized": quantized, "page_copy": copies, "goals": goals,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
