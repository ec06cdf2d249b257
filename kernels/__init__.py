"""KV-cache kernels: Triton on CUDA tensors, torch reference implementations elsewhere."""

from kernels.layout import KVLayout

__all__ = ["KVLayout"]
