"""What a KV cache of so many bytes holds: pages, tokens and concurrent sequences.

Every byte count comes from ``KVLayout`` (scales included for quantized pages), and the
concurrency rule is the engine's own (``engine/scheduler.py``): a sequence is admitted
when its prompt's pages can be allocated and grows a page at a time as it decodes; the
token sampled last is never fed back, so a sequence of ``L`` tokens (prompt + output)
holds ``ceil((L - 1) / block_size)`` pages at most. A model's shape is read from its
configuration alone: no weights are loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvgate.kernels.layout import KV_DTYPES, KVLayout


class PlanError(ValueError):
    """An input the planner cannot use; the message says which and what to do."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int

    def layout(self, block_size: int, dtype: torch.dtype) -> KVLayout:
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, block_size, dtype)


# --dtype names (serve's) → the model's dtype; auto is what the engine picks on a GPU
MODEL_DTYPES: dict[str, torch.dtype] = {
    "auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float32": torch.float32,
}
# a dtype's --kv-dtype name (``auto`` stores the model's own dtype and is named after it)
NAMES = {dtype: name for name, dtype in KV_DTYPES.items()}


def kv_dtypes(names: list[str], model_dtype: str) -> dict[str, torch.dtype]:
    """``--kv-dtype`` values (each may be a comma list) → name → dtype, in order, each
    dtype once (``auto`` is named after the dtype it stands for)."""
    if model_dtype not in MODEL_DTYPES:
        raise PlanError(f"--dtype {model_dtype!r}: use {', '.join(MODEL_DTYPES)}")
    out: dict[str, torch.dtype] = {}
    for word in (w.strip().lower() for n in names for w in n.split(",")):
        if not word:
            continue
        if word == "auto":
            dtype = MODEL_DTYPES[model_dtype]
        elif word in KV_DTYPES:
            dtype = KV_DTYPES[word]
        else:
            raise PlanError(f"--kv-dtype {word!r}: use auto, {', '.join(KV_DTYPES)}")
        if dtype not in out.values():
            out[NAMES[dtype]] = dtype
    if not out:
        raise PlanError("--kv-dtype names no dtype")
    return out


# -- reading a model's shape --------------------------------------------------------------

def model_shape(model: str) -> ModelShape:
    """The KV shape of ``--model``: demo/bench (built in), smollm2 or a .gguf file (its
    metadata), a model directory or its config.json."""
    from kvgate.gateway.engine import demo, gguf

    if model in demo.SHAPES:
        s = demo.SHAPES[model]
        return ModelShape(model, s.num_hidden_layers, s.num_key_value_heads, s.head_dim,
                          demo.MAX_POSITIONS)
    if gguf.is_gguf(model):
        return _gguf_shape(model)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"--model {model}: no such file or directory (use demo, bench, "
                        "smollm2, a .gguf file, a model directory or its config.json)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"--model {model}: cannot read {path.name} as JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"--model {model}: {path.name} is not a JSON object")
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    name = path.parent.resolve().name
    return _shape(model, name, cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"),
                  cfg.get("num_key_value_heads"), cfg.get("head_dim"), cfg.get("hidden_size"),
                  cfg.get("max_position_embeddings"))


def _gguf_shape(model: str) -> ModelShape:
    from kvgate.gateway.engine import gguf

    try:
        arch, fields = gguf.check_fields(model)  # a bad file is refused as serve refuses it
    except gguf.GGUFError as exc:
        raise PlanError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise PlanError(f"--model {model}: not a readable GGUF file ({exc})") from None

    def get(key: str) -> Any:
        field = fields.get(f"{arch}.{key}")
        try:
            return field.contents() if field is not None else None
        except (ValueError, IndexError, TypeError):
            return None

    return _shape(model, gguf.served_id(model), get("block_count"),
                  get("attention.head_count"), get("attention.head_count_kv"),
                  get("attention.key_length"), get("embedding_length"), get("context_length"))


def _shape(model: str, name: str, layers: Any, heads: Any, kv_heads: Any, head_dim: Any,
           hidden: Any, context: Any) -> ModelShape:
    def whole(value: Any) -> bool:
        return type(value) is int and value > 0

    if kv_heads is None:
        kv_heads = heads  # no grouped-query attention: a KV head per head
    if head_dim is None and whole(hidden) and whole(heads):
        head_dim = hidden // heads
    for label, value in (("layers", layers), ("KV heads", kv_heads), ("head dim", head_dim),
                         ("context length", context)):
        if not whole(value):
            raise PlanError(f"--model {model}: the configuration gives no usable number of "
                            f"{label} (got {value!r})")
    return ModelShape(name, layers, kv_heads, head_dim, context)


# -- what fits --------------------------------------------------------------------------

@dataclass(frozen=True)
class Concurrency:
    seq_len: int  # tokens per sequence, prompt and output together
    pages_per_sequence: int
    sequences: int  # at most this many run at once on the device tier
    limited_by: str  # "pages", "max_running", or "context" (longer than the model's)


def pages_per_sequence(seq_len: int, block_size: int) -> int:
    """Device pages a sequence of ``seq_len`` tokens holds at its longest: KV is written
    for every token but the last one sampled."""
    return max(1, -(-(seq_len - 1) // block_size))


def max_concurrent(layout: KVLayout, device_bytes: int, seq_len: int, max_running: int,
                   context_length: int) -> Concurrency:
    pages = pages_per_sequence(seq_len, layout.block_size)
    if seq_len > context_length:
        return Concurrency(seq_len, pages, 0, "context")
    fit = layout.pages_for_bytes(device_bytes) // pages
    if fit >= max_running:
        return Concurrency(seq_len, pages, max_running, "max_running")
    return Concurrency(seq_len, pages, fit, "pages")


@dataclass(frozen=True)
class DtypePlan:
    """One KV dtype's pages: their size, how many fit each tier, and what runs at once."""

    name: str
    layout: KVLayout
    device_pages: int
    host_pages: int
    concurrency: tuple[Concurrency, ...]

    def as_dict(self) -> dict[str, Any]:
        bs = self.layout.block_size
        return {"kv_dtype": self.name, "page_bytes": self.layout.page_bytes,
                "bytes_per_token": self.layout.bytes_per_token,
                "device_pages": self.device_pages, "host_pages": self.host_pages,
                "device_tokens": self.device_pages * bs, "host_tokens": self.host_pages * bs,
                "max_concurrent": [{"seq_len": c.seq_len,
                                    "pages_per_sequence": c.pages_per_sequence,
                                    "sequences": c.sequences, "limited_by": c.limited_by}
                                   for c in self.concurrency]}


def plan_dtype(shape: ModelShape, name: str, dtype: torch.dtype, block_size: int,
               device_bytes: int, host_bytes: int, seq_lens: list[int],
               max_running: int) -> DtypePlan:
    layout = shape.layout(block_size, dtype)
    return DtypePlan(name, layout, layout.pages_for_bytes(device_bytes),
                     layout.pages_for_bytes(host_bytes),
                     tuple(max_concurrent(layout, device_bytes, n, max_running,
                                          shape.context_length) for n in seq_lens))
