"""Pick the implementation by where the tensors live: Triton on CUDA, torch elsewhere.

``KVGATE_FORCE_TRITON=1`` sends CPU tensors to Triton too, which only works under
``TRITON_INTERPRET=1``; the tests use it to run the kernels on machines without a GPU.
The Triton modules are imported on first use, so importing ``kernels`` never imports
triton (it is optional, and ``TRITON_INTERPRET`` must be set before the kernels are
defined).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from kvgate.kernels import reference
from kvgate.kernels.layout import QUANTIZED


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def use_triton(t: torch.Tensor) -> bool:
    if not (t.is_cuda or os.environ.get("KVGATE_FORCE_TRITON") == "1"):
        return False
    if not triton_available():
        if t.is_cuda:
            return False  # a CUDA build without triton: the torch path still works
        raise RuntimeError("KVGATE_FORCE_TRITON=1 but triton is not installed")
    return True


def _check_scales(cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> None:
    """A quantized cache is read and written only with both of its scale views, and a
    cache of plain values with none."""
    if (cache.dtype in QUANTIZED) != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError(f"a {cache.dtype} KV cache needs "
                         + ("both k_scale and v_scale" if cache.dtype in QUANTIZED else "no scales"))


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write each token's K/V into slot ``page * block_size + offset``; ``-1`` skips it.

    Quantized caches (fp8/int8 values) come with their scale views ``k_scale, v_scale``
    (``KVLayout.layer_scales``): each page's scale grows to cover its new tokens.
    """
    _check_scales(k_cache, k_scale, v_scale)
    impl = _triton("triton_store") if use_triton(k_cache) else reference
    impl.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a packed batch of new tokens over their cached prefixes.

    ``max_seqlen_q`` is optional: pass it when it is known on the host to spare the
    Triton path a device sync. Quantized caches come with their scale views.
    """
    _check_scales(k_cache, k_scale, v_scale)
    impl = _triton("triton_attention") if use_triton(q) else reference
    out: torch.Tensor = impl.paged_prefill_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
        max_seqlen_q=max_seqlen_q, k_scale=k_scale, v_scale=v_scale,
    )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over all of its ``seq_lens[b]`` keys.

    ``max_seq_len`` is optional: an upper bound of ``seq_lens`` known on the host lets the
    Triton path size its KV splits to the batch instead of to the block table's width.
    Quantized caches come with their scale views.
    """
    _check_scales(k_cache, k_scale, v_scale)
    impl = _triton("triton_attention") if use_triton(q) else reference
    out: torch.Tensor = impl.paged_decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len,
        k_scale=k_scale, v_scale=v_scale,
    )
    return out
