"""`helm lint --strict` and values.schema.json: mistakes are caught before anything is applied."""

from __future__ import annotations

import helm_python as helm
import pytest
import yaml
from helm_python import HelmValuesError

from kvgate.gateway.config import parse_bytes

from .chart import CHART_DIR, NAMESPACE, RELEASE, VALUE_SETS, lint, render

ERROR, WARNING = 3, 2


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict_finds_nothing(name) -> None:
    report = lint(VALUE_SETS[name])
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= WARNING]
    assert problems == [] and report["errors"] == []


def test_lint_reports_values_that_break_the_schema() -> None:
    """Control: lint does look at values, so a clean report above means something."""
    report = lint({"replicaCount": "three"})
    assert any("replicaCount" in e for e in report["errors"])


@pytest.mark.parametrize("values, where", [
    ({"replicaCount": "3"}, "/replicaCount"),
    ({"model": {"source": "hub"}}, "/model/source"),
    ({"config": {"deviceCacheByte": "1G"}}, "/config"),
    ({"config": {"hostCacheBytes": "lots"}}, "/config/hostCacheBytes"),
    ({"config": {"dtype": "fp8"}}, "/config/dtype"),
    ({"database": {"url": "mysql://kvgate@db/kvgate"}}, "/database/url"),
    ({"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"service": {"port": 70000}}, "/service/port"),
    ({"serviceMonitor": {"interval": "soon"}}, "/serviceMonitor/interval"),
    ({"metrics": {"port": "9090"}}, "/metrics/port"),
    ({"metrics": {"scheme": "http"}}, "/metrics"),
    ({"replicas": 2}, "replicas"),
])
def test_schema_rejects_bad_values_and_names_the_key(values, where) -> None:
    with pytest.raises(HelmValuesError) as err:
        render(values)
    assert where in str(err.value)


@pytest.mark.parametrize("size", [1073741824, "512MiB", "2G", "1.5GiB", "4096"])
def test_schema_accepts_the_byte_sizes_the_server_parses(size) -> None:
    parse_bytes(size)  # the server's own parser takes it ...
    render({"config": {"hostCacheBytes": size}})  # ... and so does the chart


def test_packaged_chart_renders_like_the_source(tmp_path) -> None:
    """`helm package` keeps every file the templates read (e.g. the dashboard JSON)."""
    archive = helm.package(CHART_DIR, destination=tmp_path)
    values = VALUE_SETS["monitoring"]
    with helm.Chart.load(archive) as packaged:
        assert packaged.schema is not None
        from_archive = packaged.render(values, name=RELEASE, namespace=NAMESPACE,
                                       is_install=True)
    from_source = render(values).objects
    objects = [d for path, text in sorted(from_archive.items()) if not path.endswith(".txt")
               for d in yaml.safe_load_all(text) if d]
    assert [_without_admin_key(o) for o in objects] == [_without_admin_key(o)
                                                         for o in from_source]


def _without_admin_key(obj: dict) -> dict:
    """Random admin and metrics keys differ between two renders; everything else must not."""
    if obj["kind"] == "Secret":
        obj["data"].pop("admin-key", None)
        obj["data"].pop("metrics-key", None)
    return obj
