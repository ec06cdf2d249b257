"""Shared by the bench scripts: print a table, write ``bench/results/<name>.json``.

``KVGATE_BENCH_SMOKE=1`` runs every bench at a tiny size (``smoke(full, tiny)`` picks the
size), only to show that it still runs: its figures mean nothing and are not written.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, TypeVar

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE = os.environ.get("KVGATE_BENCH_SMOKE", "") not in ("", "0")

T = TypeVar("T")


def smoke(full: T, tiny: T) -> T:
    """``tiny`` under ``KVGATE_BENCH_SMOKE=1``, else ``full``."""
    return tiny if SMOKE else full


def machine() -> dict[str, Any]:
    """Enough to tell whether two result files are comparable."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "gpu": gpu}


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (no rows)")
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def write_result(name: str, data: dict[str, Any]) -> Path | None:
    if SMOKE:
        print(f"\nsmoke run (KVGATE_BENCH_SMOKE=1): figures not written to bench/results/{name}.json")
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**data, "machine": machine()}, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(RESULTS.parent.parent)}")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
