"""What the gateway exports on /metrics, as the dashboard may use it.

Names come from the gateway's own registry (``kvgate.gateway.http.metrics``) when that module
exists; label names come from the metrics table in docs/architecture.md, the contract
dashboards are written against (the registry cannot list the labels of a series that
has not been observed yet).
"""

from __future__ import annotations

import re

from .chart import REPO

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
_ROW = re.compile(r"^\|\s*((?:`kvgate_\w+`\s*/?\s*)+)\|\s*(\w+)\s*\|([^|]*)\|", re.M)


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """{base name: (type, label names)} from the docs' metrics table."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("## Metrics"):]
    metrics: dict[str, tuple[str, set[str]]] = {}
    for names, kind, labels in _ROW.findall(table):
        label_names = {x.strip() for x in re.sub(r"\([^)]*\)", "", labels).split(",")} - {""}
        for name in re.findall(r"`(kvgate_\w+)`", names):
            base = name.removesuffix("_total") if kind == "counter" else name
            metrics[base] = (kind, label_names)
    return metrics


def registry_metrics() -> dict[str, str]:
    """{base name: type} from the gateway's registry (``kvgate.gateway.http.metrics`` imports no
    torch: a chart test has no use for the model code)."""
    from kvgate.gateway.http import metrics

    families = {family.name: family.type for family in metrics.Metrics().registry.collect()}
    # Scrape-time figures register once engine and ledger are open; their families are
    # declared without them.
    families.update({f.name: f.type for f in metrics.snapshot_families().values()})
    return families


def exported_series() -> dict[str, tuple[str, str]]:
    """{series name as PromQL sees it: (base name, type)}."""
    source = registry_metrics()
    series: dict[str, tuple[str, str]] = {}
    for base, kind in source.items():
        for suffix in SUFFIXES.get(kind, ("",)):
            series[base + suffix] = (base, kind)
    return series
