"""What the gateway exports on /metrics, as the dashboard may use it.

Names come from the gateway's own registry (``gateway.http.metrics``) when that module
exists; label names come from the metrics table in docs/architecture.md, the contract
dashboards are written against (the registry cannot list the labels of a series that
has not been observed yet).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from types import ModuleType

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


def _load_metrics_module() -> ModuleType | None:
    """The module alone when it stands alone: ``gateway.http``'s package import brings
    the whole server (torch, the model code), which a chart test has no use for."""
    path = REPO / "gateway" / "http" / "metrics.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_kvgate_http_metrics", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # it imports its siblings: take the ordinary way
        return importlib.import_module("gateway.http.metrics")
    return module


def registry_metrics() -> dict[str, str] | None:
    """{base name: type} from the gateway's registry, or None while that module is absent."""
    module = _load_metrics_module()
    if module is None:
        return None
    metrics = module.Metrics()
    if hasattr(metrics, "watch"):  # scrape-time figures register once sources are known
        metrics.watch(lambda: {}, None, None)
    return {family.name: family.type for family in metrics.registry.collect()}


def exported_series() -> dict[str, tuple[str, str]]:
    """{series name as PromQL sees it: (base name, type)}."""
    source = registry_metrics() or {k: v[0] for k, v in documented_metrics().items()}
    series: dict[str, tuple[str, str]] = {}
    for base, kind in source.items():
        for suffix in SUFFIXES.get(kind, ("",)):
            series[base + suffix] = (base, kind)
    return series
