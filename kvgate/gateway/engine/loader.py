"""Loads the model the engine serves: ``smollm2`` (a real instruct model from its wheel),
a GGUF file, a local model directory, or the built-in random-weight ``demo``/``bench``.

Never touches a model hub: the offline flags are set before transformers reads anything
and every load passes ``local_files_only=True``, so a missing file is an error that names
it rather than a download attempt. transformers is imported where a model is loaded:
reading a tokenizer (the router's) does without it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from kvgate.gateway.engine import demo, gguf
from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("kvgate.engine")

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
DEMO_NOTE = "demo model: random weights, its text is meaningless"
TOOLS_NOTE = ("the model's chat template has no tools: kvgate writes tools and tool turns in "
              "the Hermes form (<tools>, <tool_call>, <tool_response>), which the hermes "
              "tool-call parser reads back")


class ModelFilesMissing(FileNotFoundError):
    """The --model directory lacks a file the engine needs; the message names it."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: TextTokenizer
    model_id: str
    info: dict[str, Any] = field(default_factory=dict)


def load_model(config: EngineConfig) -> LoadedModel:
    from kvgate.gateway.engine import attention

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    impl = attention.register()
    device, dtype = config.torch_device, config.torch_dtype
    with tqdm(total=3, desc=f"loading model {config.model}", unit="step", leave=False) as bar:
        if config.model in demo.SHAPES:
            bar.set_postfix_str("tokenizer")
            tokenizer = demo.build_tokenizer()
            bar.update()
            bar.set_postfix_str("weights (seeded)")
            model: PreTrainedModel = demo.build_model(
                config.model, seed=config.seed, dtype=dtype, attn_implementation=impl)
            bar.update()
            model_id, is_demo = config.model, True
            sampling_defaults: dict[str, float] = {}
        else:
            if gguf.is_gguf(config.model):  # converted once into a cached model directory
                path = gguf.resolve(config.model, dtype)
                model_id = gguf.served_id(config.model)
            else:
                path = Path(config.model).expanduser()
                model_id = path.resolve().name
            check_model_dir(path)
            bar.set_postfix_str("tokenizer")
            tokenizer = load_tokenizer(path)
            bar.update()
            bar.set_postfix_str("weights")
            model = _load_weights(path, dtype, impl)
            bar.update()
            is_demo = False
            sampling_defaults = model_sampling_defaults(path)
        bar.set_postfix_str(str(device))
        torch.nn.Module.to(model, device)  # in place; a plain model has nothing to guard
        model.eval()
        bar.update()
    cfg = model.config
    info = {
        "id": model_id,
        "demo": is_demo,
        "architecture": cfg.model_type,
        "context_length": int(cfg.max_position_embeddings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim_of(cfg),
        "vocab_size": cfg.vocab_size,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        # What a request that names no temperature/top_p/top_k gets (the model's own
        # generation_config.json, as vLLM's --generation-config auto does).
        "sampling_defaults": sampling_defaults,
    }
    if is_demo:
        info["note"] = DEMO_NOTE
        log.warning("serving the %s", DEMO_NOTE)
    elif tokenizer.chat_template and not tokenizer.template_reads_tools:
        info["note"] = TOOLS_NOTE
        log.info(TOOLS_NOTE)
    log.info(
        "model %s (%s): %d layers, hidden %d, %d/%d heads x %d, %.1fM parameters, %s %s",
        model_id, cfg.model_type, info["layers"], info["hidden_size"], info["attention_heads"],
        info["kv_heads"], info["head_dim"], info["parameters"] / 1e6, device, info["dtype"],
    )
    return LoadedModel(model, tokenizer, model_id, info)


SAMPLING_FIELDS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (0, 1 << 31)}


def model_sampling_defaults(path: Path) -> dict[str, float]:
    """The model's recommended sampling (``generation_config.json``), where it sets any:
    ``temperature``, ``top_p`` and ``top_k``, each checked against its range; an explicit
    ``"do_sample": false`` (what ``generate()`` then does) is greedy, temperature 0."""
    gen = _read_json(path / "generation_config.json")
    if gen.get("do_sample") is False:
        return {"temperature": 0.0}
    out: dict[str, float] = {}
    for name, (lo, hi) in SAMPLING_FIELDS.items():
        value = gen.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi:
            out[name] = value
    return out


def head_dim_of(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def check_model_dir(path: Path) -> None:
    if path.is_file():
        raise ModelFilesMissing(
            f"--model {path}: a file, but neither a .gguf file nor a model directory "
            "(use 'smollm2', a .gguf file, a local model directory, or 'demo')")
    if not path.is_dir():
        raise ModelFilesMissing(
            f"--model {path}: no such directory (use 'smollm2', a .gguf file, a local model "
            "directory, or 'demo')"
        )
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelFilesMissing(f"--model {path}: {name} is missing from the directory")
    if not any(path.glob("*.safetensors")):
        raise ModelFilesMissing(f"--model {path}: no *.safetensors weight file in the directory")


def _load_weights(path: Path, dtype: torch.dtype, impl: str) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if cfg.model_type not in SUPPORTED_TYPES:
        log.warning("model type %r is not one of %s; trying anyway", cfg.model_type, SUPPORTED_TYPES)
    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, attn_implementation=impl, use_safetensors=True
    )


def load_tokenizer(path: Path) -> TextTokenizer:
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg = _read_json(path / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos = [_token_text(cfg.get("eos_token"))]
    gen = _read_json(path / "generation_config.json")
    eos_ids = gen.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
    eos += [tok.id_to_token(i) for i in eos_ids if tok.id_to_token(i) is not None]
    return TextTokenizer(tok, template, bos_token=_token_text(cfg.get("bos_token")),
                         eos_tokens=[e for e in eos if e])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(tok: object) -> str | None:
    """A special token from ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def save_pretrained(loaded: LoadedModel, path: str | Path) -> None:
    """Writes a directory ``--model PATH`` can load (used to hand the demo model around)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    loaded.model.save_pretrained(path)
    t = loaded.tokenizer
    eos = [t.tokenizer.id_to_token(i) for i in t.eos_token_ids]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=t.tokenizer, bos_token=t.bos_token, eos_token=eos[0] if eos else None
    )
    if t.chat_template:
        fast.chat_template = t.chat_template
    fast.save_pretrained(path)
