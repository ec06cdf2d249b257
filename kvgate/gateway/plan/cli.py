"""``kvgate plan``: how much a KV cache holds, and the hit rate a trace would get from it.

Prints (or ``--json``) per KV dtype: bytes per page and per token, pages per tier, and the
most sequences of each ``--seq-len`` that run at once on the device tier; with
``--trace``, the hit rate and cache-read share at each device tier size, replayed through
the real cache store; ``--plot`` draws them (matplotlib, ``pip install 'kvgate[plan]'``).
Nothing is served and no weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kvgate.gateway.config import parse_bytes

DEFAULT_DEVICE_BYTES = 256 * 1024**2  # serve's defaults
DEFAULT_HOST_BYTES = 512 * 1024**2


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="capacity planner: KV bytes, concurrent sequences, hit rate per size",
        description="Plan KV cache capacity: bytes per token and pages per tier for each KV "
        "dtype, the most concurrent sequences of given lengths the device tier admits, and "
        "with --trace the hit rate a cache of each size would have had (replayed through "
        "the real cache store). Loads no weights and serves nothing.")
    p.add_argument("--model", default="smollm2",
                   help="demo, bench, smollm2 (the default), a .gguf file, a model "
                        "directory or its config.json")
    p.add_argument("--dtype", default="auto",
                   help="the model's dtype: auto (bfloat16, what serve picks on a GPU), "
                        "float32, bfloat16 or float16; --kv-dtype auto stores it")
    p.add_argument("--kv-dtype", action="append", default=None, metavar="DTYPE[,DTYPE]",
                   help="KV page dtypes to compare: auto, fp8, int8, bf16, fp16, fp32 "
                        "(repeat or comma list; default auto,fp8)")
    p.add_argument("--device-cache-bytes", default=None, metavar="BYTES",
                   help="the device tier (256MiB), e.g. 8GiB")
    p.add_argument("--host-cache-bytes", default=None, metavar="BYTES",
                   help="the host tier (512MiB), e.g. 32GiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (16)")
    p.add_argument("--max-running", type=int, default=64,
                   help="serve's cap on running sequences (64)")
    p.add_argument("--seq-len", action="append", default=None, metavar="N[,N]",
                   help="sequence lengths, prompt + output tokens (default 2048,8192)")
    p.add_argument("--trace", type=Path, default=None, metavar="FILE",
                   help="a Mooncake trace or kvgate receipts, one JSON object a line")
    p.add_argument("--trace-format", default="auto", help="auto | mooncake | receipts")
    p.add_argument("--max-requests", type=int, default=None, metavar="N",
                   help="replay the trace's first N requests only")
    p.add_argument("--max-blocks", type=int, default=None, metavar="N",
                   help="refuse a trace of more than N blocks to replay (2000000; the "
                        "largest replay holds about 2 KB of memory a block)")
    p.add_argument("--ttl", type=float, default=300.0, metavar="SECONDS",
                   help="cache TTL of a replayed request that names none (300)")
    p.add_argument("--tier-sizes", action="append", default=None, metavar="BYTES[,BYTES]",
                   help="device tier sizes to replay the trace at (default: the device "
                        "tier's from 1/16 to 4 times, doubling)")
    p.add_argument("--workers", type=int, default=1, help="processes replaying at once (1)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="write hit rate vs capacity per KV dtype (needs matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from concurrent.futures.process import BrokenProcessPool

    from kvgate.cachestore.replay import TraceError
    from kvgate.gateway.plan.capacity import PlanError

    try:
        report = build(args)
    except (PlanError, TraceError) as exc:
        print(f"kvgate plan: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, BrokenProcessPool):  # the replay outgrew memory (--max-blocks)
        print("kvgate plan: out of memory replaying the trace; replay fewer requests "
              "(--max-requests) or blocks (--max-blocks)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    if args.plot is not None:
        try:
            plot(report, args.plot)
        except PlanError as exc:
            print(f"kvgate plan: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _words(values: list[str] | None, default: list[str]) -> list[str]:
    return [w.strip() for v in values or default for w in v.split(",") if w.strip()]


def _size(flag: str, text: str | None, default: int, minimum: int) -> int:
    from kvgate.gateway.plan.capacity import PlanError

    try:
        value = default if text is None else parse_bytes(text)
    except (ValueError, OverflowError) as exc:
        raise PlanError(f"{flag}: {exc}") from None
    if value < minimum:
        raise PlanError(f"{flag} {text}: must be at least {minimum} bytes")
    return value


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``kvgate plan`` reports, as JSON-ready data."""
    from kvgate.gateway.plan.capacity import PlanError, kv_dtypes, model_shape, plan_dtype

    if args.plot is not None and args.trace is None:
        raise PlanError("--plot draws the hit rate of a trace: give --trace too")
    if args.plot is not None:  # checked now, not after a replay of minutes
        _check_plot(args.plot)
    if args.block_size <= 0 or args.max_running <= 0 or args.workers <= 0:
        raise PlanError("--block-size, --max-running and --workers must be positive")
    if not args.ttl > 0:
        raise PlanError("--ttl must be a positive number of seconds")
    if args.max_requests is not None and args.max_requests <= 0:
        raise PlanError("--max-requests must be positive")
    if args.max_blocks is not None and args.max_blocks <= 0:
        raise PlanError("--max-blocks must be positive")
    device = _size("--device-cache-bytes", args.device_cache_bytes, DEFAULT_DEVICE_BYTES, 1)
    host = _size("--host-cache-bytes", args.host_cache_bytes, DEFAULT_HOST_BYTES, 0)
    try:
        seq_lens = [int(w) for w in _words(args.seq_len, ["2048,8192"])]
    except ValueError:
        raise PlanError("--seq-len takes whole numbers of tokens, e.g. 2048,8192") from None
    if not seq_lens or min(seq_lens) <= 0:
        raise PlanError("--seq-len takes positive numbers of tokens")
    dtypes = kv_dtypes(_words(args.kv_dtype, ["auto,fp8"]), args.dtype)
    shape = model_shape(args.model)
    plans = [plan_dtype(shape, name, dtype, args.block_size, device, host, seq_lens,
                        args.max_running) for name, dtype in dtypes.items()]
    report: dict[str, Any] = {
        "model": {"name": shape.name, "layers": shape.num_layers,
                  "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                  "context_length": shape.context_length, "dtype": args.dtype},
        "block_size": args.block_size, "device_cache_bytes": device,
        "host_cache_bytes": host, "max_running": args.max_running,
        "kv_dtypes": [p.as_dict() for p in plans],
    }
    if args.trace is not None:
        report["trace"] = _trace(args, {p.name: p.layout for p in plans}, device, host)
    return report


def _trace(args: argparse.Namespace, layouts: dict[str, Any], device: int,
           host: int) -> dict[str, Any]:
    from kvgate.cachestore.replay import DEFAULT_MAX_BLOCKS
    from kvgate.gateway.plan.sweep import sweep
    from kvgate.gateway.plan.traces import read_trace

    if args.tier_sizes:
        sizes = [_size("--tier-sizes", w, 0, 1) for w in _words(args.tier_sizes, [])]
    else:
        sizes = [max(1, device * 2**k // 16) for k in range(7)]
    trace = read_trace(args.trace, args.trace_format, args.block_size, args.ttl,
                       args.max_requests, args.max_blocks or DEFAULT_MAX_BLOCKS)

    def progress(done: int, total: int) -> None:  # on a terminal only, never in a log
        print(f"\rreplaying {trace.name}: {done}/{total}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    return sweep(trace, layouts, sorted(set(sizes)), host, args.workers,
                 progress if sys.stderr.isatty() else None).as_dict()


# -- output --------------------------------------------------------------------------------

def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


def print_report(report: dict[str, Any]) -> None:
    from kvgate.gateway.ledger.cli import print_table

    m = report["model"]
    print(f"model {m['name']}: {m['layers']} layers, {m['kv_heads']} KV heads x {m['head_dim']}, "
          f"context {m['context_length']}; blocks of {report['block_size']} tokens")
    print(f"device tier {_bytes(report['device_cache_bytes'])}, host tier "
          f"{_bytes(report['host_cache_bytes'])}, at most {report['max_running']} running\n")
    rows = []
    for d in report["kv_dtypes"]:
        row = {"kv_dtype": d["kv_dtype"], "page_bytes": d["page_bytes"],
               "bytes/token": f"{d['bytes_per_token']:g}", "device_pages": d["device_pages"],
               "host_pages": d["host_pages"], "device_tokens": d["device_tokens"]}
        for c in d["max_concurrent"]:
            seqs = str(c["sequences"]) + ("" if c["limited_by"] == "pages" else
                                          f" ({c['limited_by']})")
            row[f"seqs@{c['seq_len']}"] = seqs
        rows.append(row)
    print_table(rows, list(rows[0]))
    trace = report.get("trace")
    if not trace:
        return
    print(f"\ntrace {trace['name']}: {trace['requests']} requests, {trace['prompt_tokens']} "
          f"prompt tokens, replayed in blocks of {trace['block_tokens']} tokens; host tier "
          f"{_bytes(report['host_cache_bytes'])} in every row")
    rows = [{"kv_dtype": r["kv_dtype"], "device_bytes": _bytes(r["device_cache_bytes"]),
             "device_blocks": r["device_blocks"], "host_blocks": r["host_blocks"],
             "hit_rate": f"{r['hit_rate']:.4f}", "read_share": f"{r['cache_read_share']:.4f}"}
            for r in trace["rows"]]
    rows.append({"kv_dtype": "unbounded", "hit_rate": f"{trace['unbounded_hit_rate']:.4f}",
                 "read_share": f"{trace['unbounded_read_share']:.4f}"})
    print_table(rows, ["kv_dtype", "device_bytes", "device_blocks", "host_blocks", "hit_rate",
                       "read_share"])


def _check_plot(path: Path) -> None:
    from kvgate.gateway.plan.capacity import PlanError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlanError("--plot needs matplotlib: pip install 'kvgate[plan]'") from None
    if path.suffix.lower() != ".png":
        raise PlanError(f"--plot {path}: the plot is a PNG; give a path ending in .png")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise PlanError(f"--plot {path}: {folder} is not a directory this user can write to")


def plot(report: dict[str, Any], path: Path) -> None:
    """Hit rate and cache-read share vs device tier bytes, a line per KV dtype."""
    from kvgate.gateway.plan.capacity import PlanError

    try:
        import matplotlib
    except ImportError:
        raise PlanError("--plot needs matplotlib: pip install 'kvgate[plan]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = report["trace"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, unbounded, label in (
            (axes[0], "hit_rate", "unbounded_hit_rate", "hit rate (blocks)"),
            (axes[1], "cache_read_share", "unbounded_read_share", "cache-read share (tokens)")):
        for d in report["kv_dtypes"]:
            rows = [r for r in trace["rows"] if r["kv_dtype"] == d["kv_dtype"]]
            ax.plot([r["device_cache_bytes"] / 1024**3 for r in rows], [r[key] for r in rows],
                    marker="o", label=f"{d['kv_dtype']} ({d['bytes_per_token']:g} B/token)")
        ax.axhline(trace[unbounded], color="grey", linestyle="--", label="unbounded")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("device tier (GiB)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{report['model']['name']}, trace {trace['name']}, host tier "
                 f"{_bytes(report['host_cache_bytes'])}")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=120)
    except OSError as exc:
        raise PlanError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
