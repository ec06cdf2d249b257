"""Render the chart with Helm's own library and look at the result as Kubernetes objects.

Rendering goes through ``helm_python`` (Helm's Go SDK behind a C ABI), so templates,
values coalescing and ``values.schema.json`` behave exactly as ``helm install`` would;
no helm binary and no cluster are involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "kvgate"
RELEASE = "kvg"
NAMESPACE = "serving"
FULLNAME = f"{RELEASE}-kvgate"
KUBE_VERSION = "1.30.0"

# Value sets an operator would really install with.
PG_URL = "postgresql+asyncpg://kvgate:s3cret@postgres.db.svc:5432/kvgate"
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": {
        "gpu": {"enabled": True},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "config": {"deviceCacheBytes": 17179869184, "dtype": "bfloat16",
                   "metricsTenantLabels": False},
    },
    "postgres-3-replicas": {"replicaCount": 3, "database": {"url": PG_URL}},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                   "dashboard": {"enabled": True}},
    "existing-secret": {
        "replicaCount": 2,
        "existingSecret": {"name": "kvgate-creds", "adminKeyKey": "admin",
                           "databaseUrlKey": "db-url"},
    },
    "model-pvc-autoscaled": {
        "model": {"source": "pvc", "subPath": "llama-3.2-1b", "pvc": {"claimName": "models"}},
        "database": {"url": PG_URL},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "gpu": {"enabled": True, "count": 2},
    },
    "model-hostpath": {"model": {"source": "hostPath", "hostPath": {"path": "/srv/models/qwen"}}},
}


@dataclass
class Rendered:
    """One render: every object, plus NOTES.txt, which Helm prints instead of applying."""

    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind)
                 if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    def pod_specs(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(owner, pod spec) for every workload that starts pods."""
        for o in self.objects:
            if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
                yield o, o["spec"]["template"]["spec"]

    def containers(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(pod spec, container) for every container and init container."""
        for _, spec in self.pod_specs():
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield spec, c


def render(values: dict[str, Any] | None = None) -> Rendered:
    """Render as `helm install` would: raises HelmValuesError / HelmRenderError on bad values."""
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE,
                                 is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(objects, notes)


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return helm.lint(CHART_DIR, values or {}, strict=True, namespace=NAMESPACE,
                     kube_version=f"v{KUBE_VERSION}")


def validate_kubernetes(obj: dict[str, Any]) -> None:
    """Strict schema check against Kubernetes' own OpenAPI (unknown fields are errors)."""
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_refs(container: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, secret name, key) for every secretKeyRef of a container."""
    return [(e["name"], e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})]
