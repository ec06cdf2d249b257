"""KV-cache kernels: Triton on CUDA tensors, torch reference implementations elsewhere."""

from kvgate.kernels.copy import copy_pages
from kvgate.kernels.dispatch import paged_decode_attention, paged_prefill_attention, store_kv
from kvgate.kernels.layout import KVLayout

__all__ = [
    "KVLayout",
    "copy_pages",
    "paged_decode_attention",
    "paged_prefill_attention",
    "store_kv",
]
