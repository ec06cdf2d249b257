"""ServiceMonitor and Grafana dashboard: they scrape the right port and query real series.

The ServiceMonitor is a prometheus-operator CRD, absent from Kubernetes' own schemas, so
its structure is checked here against the fields the operator requires and against the
Service it must find.
"""

from __future__ import annotations

import base64
import json
import re

import jsonschema
import promql_parser
import pytest
from helm_python import HelmRenderError

from kvgate.gateway.config import Settings

from .chart import CHART_DIR, FULLNAME, NAMESPACE, VALUE_SETS, env_of, render
from .metrics_contract import documented_metrics, exported_series, registry_metrics

DASHBOARD = json.loads((CHART_DIR / "files" / "dashboard.json").read_text())

# The part of monitoring.coreos.com/v1 ServiceMonitor the chart uses.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object",
                                                            "minProperties": 1}}},
                "namespaceSelector": {"type": "object",
                                      "properties": {"matchNames": {"type": "array"}}},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string",
                                              "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "authorization": {
                                "type": "object", "additionalProperties": False,
                                "required": ["type", "credentials"],
                                "properties": {
                                    "type": {"const": "Bearer"},
                                    "credentials": {
                                        "type": "object", "additionalProperties": False,
                                        "required": ["name", "key"],
                                        "properties": {"name": {"type": "string"},
                                                       "key": {"type": "string"}}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# Grafana's variables, replaced by values of the same type so the parser can read the query.
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "6h", "$tenant": ".*"}


def _queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query, rows' nested panels included."""
    out = []
    for panel in DASHBOARD["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                out.append((p["title"], target["expr"], target.get("legendFormat", "")))
    return out


def _parse(expr: str) -> promql_parser.Expr:
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return promql_parser.parse(expr)


def _selectors(node: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(node, lambda n: found.append(n) if isinstance(
        n, promql_parser.VectorSelector) else None)
    return found


def _aggregations(node: promql_parser.Expr) -> list[promql_parser.AggregateExpr]:
    found: list[promql_parser.AggregateExpr] = []
    promql_parser.walk(node, lambda n: found.append(n) if isinstance(
        n, promql_parser.AggregateExpr) else None)
    return found


def test_service_monitor_scrapes_the_service_metrics_port() -> None:
    r = render(VALUE_SETS["monitoring"])
    monitor = r.one("ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    assert monitor["metadata"]["labels"]["release"] == "prom"  # what Prometheus selects by
    service = r.one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert not render().of_kind("ServiceMonitor")


def test_service_monitor_scrapes_the_metrics_port_with_the_metrics_key() -> None:
    """/metrics is served on its own port only (the API port answers 404), behind a key:
    the ServiceMonitor must use that port and send the key the server reads."""
    r = render(VALUE_SETS["monitoring"])
    (endpoint,) = r.one("ServiceMonitor")["spec"]["endpoints"]
    service_port = {p["name"]: p for p in r.one("Service")["spec"]["ports"]}[endpoint["port"]]
    container = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = Settings.from_env(r.one("ConfigMap", FULLNAME)["data"])
    assert container_ports[service_port["targetPort"]] == settings.metrics.metrics_port
    assert settings.metrics.metrics_port != settings.http.port == container_ports["http"]
    # The bearer key the scraper sends is the very Secret entry the server reads.
    credentials = endpoint["authorization"]["credentials"]
    server_key = env_of(container)["KVGATE_METRICS_KEY"]["valueFrom"]["secretKeyRef"]
    assert (credentials["name"], credentials["key"]) == (server_key["name"], server_key["key"])
    secret = r.one("Secret", credentials["name"])
    assert len(base64.b64decode(secret["data"][credentials["key"]])) >= 40


def test_metrics_key_from_values_or_an_existing_secret() -> None:
    given = render({"metrics": {"key": "scrape-me"}}).one("Secret")["data"]["metrics-key"]
    assert base64.b64decode(given).decode() == "scrape-me"
    values = {**VALUE_SETS["existing-secret"], **VALUE_SETS["monitoring"]}
    values["existingSecret"] = {**values["existingSecret"], "metricsKeyKey": "metrics"}
    r = render(values)
    (endpoint,) = r.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "kvgate-creds", "key": "metrics"}
    container = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["KVGATE_METRICS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "kvgate-creds", "key": "metrics"}


def test_metrics_port_must_differ_from_the_api_port() -> None:
    with pytest.raises(HelmRenderError, match=r"metrics\.port=8000"):
        render({"metrics": {"port": 8000}})


def test_dashboard_config_map_carries_the_dashboard_for_grafana() -> None:
    r = render(VALUE_SETS["monitoring"])
    config_map = r.one("ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kvgate.json"]) == DASHBOARD
    assert [c["metadata"]["name"] for c in render().of_kind("ConfigMap")] == [FULLNAME]


def test_every_dashboard_query_parses_as_promql() -> None:
    queries = _queries()
    assert len(queries) >= 10
    for title, expr, _ in queries:
        _parse(expr)  # raises ValueError on a syntax error
        assert re.search(r"kvgate_\w+", expr), title


def test_dashboard_names_only_series_the_gateway_exports() -> None:
    series = exported_series()
    used = set()
    for title, expr, _ in _queries():
        for selector in _selectors(_parse(expr)):
            assert selector.name in series, f"{title}: {selector.name} is not exported"
            used.add(selector.name)
            _, kind = series[selector.name]
            if kind == "histogram" and "histogram_quantile" in expr:
                assert selector.name.endswith("_bucket"), f"{title}: quantile of {selector.name}"
    # Also the names in variable queries and any other string of the dashboard.
    for name in re.findall(r"kvgate_\w+", json.dumps(DASHBOARD)):
        assert name in series, name


def test_dashboard_filters_and_groups_by_labels_the_series_carry() -> None:
    documented = documented_metrics()
    series = exported_series()

    def labels(selector_name: str) -> set[str]:
        base, _ = series[selector_name]
        extra = {"le"} if selector_name.endswith("_bucket") else set()
        return documented[base][1] | extra

    for title, expr, legend in _queries():
        tree = _parse(expr)
        for selector in _selectors(tree):
            for matcher in selector.matchers.matchers:
                if matcher.name != "__name__":
                    assert matcher.name in labels(selector.name), f"{title}: {matcher.name}"
        grouped: set[str] = set()
        for agg in _aggregations(tree):
            if agg.modifier is None:
                continue
            inside = _selectors(agg.expr)
            for label in agg.modifier.labels:
                for selector in inside:
                    assert label in labels(selector.name), f"{title}: by ({label})"
            grouped |= set(agg.modifier.labels)
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert label in grouped, f"{title}: legend {{{{{label}}}}} is never grouped by"


@pytest.mark.parametrize("metric, by", [
    ("kvgate_cache_hit_tokens_total", None),  # hit rate
    ("kvgate_cache_miss_tokens_total", None),
    ("kvgate_ttft_seconds_bucket", "cache"),  # TTFT, hit vs miss
    ("kvgate_cache_bytes", "tier"),  # tier occupancy
    ("kvgate_cache_evictions_total", "reason"),
    ("kvgate_prompt_tokens_total", "tenant"),  # tokens by tenant
    ("kvgate_completion_tokens_total", "tenant"),
    ("kvgate_cost_micros_total", "tenant"),  # cost by tenant
])
def test_dashboard_shows_what_operators_ask_for(metric, by) -> None:
    for _, expr, _ in _queries():
        tree = _parse(expr)
        for agg in _aggregations(tree):
            names = {s.name for s in _selectors(agg.expr)}
            if metric in names and (by is None or (agg.modifier and by in agg.modifier.labels)):
                return
    pytest.fail(f"no panel aggregates {metric}" + (f" by {by}" if by else ""))


def test_metric_names_come_from_the_gateway_registry() -> None:
    names = registry_metrics()
    assert names and all(name.startswith("kvgate_") for name in names)
