"""Engine configuration: what the engine acts on, resolved once.

It knows nothing of the HTTP server's settings (the server maps its own onto it), so the
engine can be built and tested without the HTTP layer. ``device`` and ``dtype`` arrive as
the user typed them (``auto``); they are resolved here so every other file sees a concrete
``torch.device`` and ``torch.dtype``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from kvgate.cachestore.disk_tier import DiskTierConfig
from kvgate.cachestore.remote_tier import RemoteTierConfig
from kvgate.kernels.layout import KV_DTYPES

log = logging.getLogger("kvgate.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KV_DTYPES = ("auto", "fp8", "int8")


@dataclass
class EngineConfig:
    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    device_cache_bytes: int = 256 * 1024 * 1024
    host_cache_bytes: int = 512 * 1024 * 1024
    block_size: int = 16
    kv_dtype: str = "auto"  # auto (the model's dtype) | fp8 | int8 (``kv_dtypes``)
    offload_kv_dtype: str = "auto"  # the host tier's: auto (as the device's) | fp8 | int8
    max_batch_tokens: int = 2048
    max_running: int = 64
    max_queue: int = 256
    default_cache_ttl_seconds: float = 300.0
    max_model_len: int = 0  # 0 = the model's own context length
    cache_shares: bool = False  # fair shares for every active tenant (cachestore/shares.py)
    num_threads: int = 0  # 0 = every core torch sees
    seed: int = 0  # demo weights
    cuda_graphs: bool = True  # decode steps replay captured graphs (CUDA with triton only)
    # One prefill per prefix: a queued request whose next prompt blocks a running request
    # of its namespace is computing waits for them, at most this many steps (then it
    # computes them itself); 0 turns the waiting off (``Scheduler._waits``).
    single_flight_wait_steps: int = 256
    # Tenant-fair scheduling (``engine/fairness.py``); False: first come, first served
    fair_scheduling: bool = True
    # With two or more tenants busy, a step computes at most this many tokens (decodes,
    # then at least a quarter of it for prompts): a newcomer's first token does not wait
    # behind another tenant's long prefill step; 0 = max_batch_tokens always
    contended_batch_tokens: int = 512
    # A streaming request whose client leaves this many token events unread is parked
    # (no slot, no pages) until it reads half of them; 0: never parked
    max_unread_tokens: int = 256
    remote_tier: RemoteTierConfig | None = None  # the Valkey tier (cachestore/remote_tier.py)
    disk_tier: DiskTierConfig | None = None  # the local disk tier (cachestore/disk_tier.py)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_batch_tokens <= 0 or self.max_running <= 0:
            raise ValueError("block_size, max_batch_tokens and max_running must be positive")
        if self.contended_batch_tokens < 0:
            raise ValueError("contended_batch_tokens must be 0 (off) or positive")
        if self.max_unread_tokens < 0:
            raise ValueError("max_unread_tokens must be 0 (never park) or positive")
        if self.single_flight_wait_steps < 0:
            raise ValueError("single_flight_wait_steps must be 0 (off) or positive")
        if self.max_model_len < 0:
            raise ValueError("max_model_len must be positive (0: the model's own context)")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        for name in ("kv_dtype", "offload_kv_dtype"):
            if getattr(self, name) not in _KV_DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r}: use auto, fp8 or int8")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r}: use auto, cpu or cuda")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``auto``: bf16 on CUDA (tensor cores), fp32 on CPU (bf16 matmuls are slow there)."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    def threads(self) -> int:
        return self.num_threads or int(os.environ.get("KVGATE_NUM_THREADS", 0)) or torch.get_num_threads()

    def kv_dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """The dtypes of the device tier's and the host tier's K/V values. ``fp8`` is e4m3
        where the device computes with it (the CPU, CUDA 8.9+), int8 elsewhere."""
        def resolve(name: str, auto: torch.dtype) -> torch.dtype:
            if name == "auto":
                return auto
            if name == "fp8" and not fp8_supported(self.torch_device):
                log.warning("--kv-dtype fp8: %s has no fp8; its KV pages are int8",
                            self.torch_device)
                return KV_DTYPES["int8"]
            return KV_DTYPES[name]
        device = resolve(self.kv_dtype, model_dtype)
        return device, resolve(self.offload_kv_dtype, device)


def fp8_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)
