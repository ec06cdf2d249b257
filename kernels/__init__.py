"""KV-cache kernels: Triton on CUDA tensors, torch reference implementations elsewhere."""

from kernels.copy import copy_pages
from kernels.dispatch import paged_decode_attention, paged_prefill_attention, store_kv
from kernels.layout import KVLayout

__all__ = [
    "KVLayout",
    "copy_pages",
    "paged_decode_attention",
    "paged_prefill_attention",
    "store_kv",
]
