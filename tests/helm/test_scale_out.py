"""Scale-out topologies: routers, engine replicas, Valkey (external or the chart's),
NetworkPolicies and KEDA, each rendered, linted and validated against Kubernetes' schemas."""

from __future__ import annotations

import base64
from typing import Any

import jsonschema
import pytest
from helm_python import HelmRenderError

from kvgate.gateway.config import Settings, names

from .chart import FULLNAME, NAMESPACE, PG_URL, Rendered, env_of, lint, render, validate_kubernetes
from .metrics_contract import registry_metrics

VALKEY_URL = "redis://:v4lkey@valkey.cache.svc:6379/2"
SCALED = {"replicaCount": 3, "database": {"url": PG_URL}, "router": {"enabled": True}}
TOPOLOGIES: dict[str, dict[str, Any]] = {
    "single": {},
    "single-shared-tier": {"valkey": {"deploy": True}, "sharedTier": {"enabled": True}},
    "scaled-external-valkey": {**SCALED, "valkey": {"url": VALKEY_URL},
                               "sharedTier": {"enabled": True, "secret": "mac-key"},
                               "router": {"enabled": True, "autoscaling": {
                                   "enabled": True, "requestsPerSecond": 40}}},
    "scaled-chart-valkey": {**SCALED, "valkey": {"deploy": True},
                            "sharedTier": {"enabled": True}},
    "keda": {**SCALED, "replicaCount": 1, "valkey": {"deploy": True},
             "sharedTier": {"enabled": True}, "keda": {"enabled": True}},
    "existing-secret": {**SCALED, "database": {"url": ""},
                        "existingSecret": {"name": "creds", "databaseUrlKey": "db",
                                           "valkeyUrlKey": "valkey",
                                           "sharedTierSecretKey": "mac"},
                        "sharedTier": {"enabled": True}},
}

# The part of keda.sh/v1alpha1 ScaledObject the chart uses (a CRD: not in Kubernetes' schemas).
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"},
                                                  "apiVersion": {"type": "string"},
                                                  "kind": {"type": "string"}},
                                   "additionalProperties": False},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {"type": {"const": "prometheus"}, "metadata": {
                        "type": "object", "required": ["serverAddress", "query", "threshold"],
                        "additionalProperties": {"type": "string"}}}}},
            },
        },
    },
}


@pytest.fixture(scope="module", params=sorted(TOPOLOGIES))
def topology(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    return request.param, render(TOPOLOGIES[request.param])


def _deployment(r: Rendered, component: str) -> dict[str, Any]:
    (found,) = [d for d in r.of_kind("Deployment")
                if d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                == component]
    return found


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"]["labels"]
    return labels


def test_every_topology_lints_clean_and_validates_against_kubernetes(
        topology: tuple[str, Rendered]) -> None:
    name, r = topology
    report = lint(TOPOLOGIES[name])
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    for obj in r.objects:
        assert obj["metadata"]["namespace"] == NAMESPACE
        if obj["apiVersion"] == "keda.sh/v1alpha1":
            jsonschema.validate(obj, SCALED_OBJECT_SCHEMA)
        else:
            validate_kubernetes(obj)


def test_a_single_replica_renders_no_scale_out_objects() -> None:
    r = render()
    assert {o["kind"] for o in r.objects}.isdisjoint(
        {"NetworkPolicy", "StatefulSet", "ScaledObject", "HorizontalPodAutoscaler"})
    env = env_of(_deployment(r, "server")["spec"]["template"]["spec"]["containers"][0])
    assert "KVGATE_REPLICA_ID" not in env and "KVGATE_SHARED_TIER_URL" not in env


def test_engines_are_known_by_their_pod_address_through_a_headless_service() -> None:
    r = render(TOPOLOGIES["scaled-chart-valkey"])
    engine = _deployment(r, "server")
    (server,) = engine["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in server["env"]]
    env = env_of(server)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert names.index("POD_IP") < names.index("KVGATE_REPLICA_ID")  # $(POD_IP) expands
    assert env["KVGATE_REPLICA_ID"]["value"] == "http://$(POD_IP):8000"
    headless = r.one("Service", f"{FULLNAME}-engines")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= _labels(engine).items()
    router = _deployment(r, "router")
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["route"]
    renv = env_of(container)
    assert renv["KVGATE_REPLICAS_DNS"]["value"] == f"{FULLNAME}-engines.{NAMESPACE}.svc:8000"
    assert renv["KVGATE_DB"]["valueFrom"]["secretKeyRef"]["key"] == "database-url"
    assert "KVGATE_ADMIN_KEY" in renv
    assert renv["KVGATE_EVENTS_URL"] == env["KVGATE_EVENTS_URL"]
    service = r.one("Service", f"{FULLNAME}-router")
    assert service["spec"]["selector"].items() <= _labels(router).items()
    assert not service["spec"]["selector"].items() <= _labels(engine).items()


def test_the_charts_valkey_is_what_the_engines_and_routers_use() -> None:
    r = render(TOPOLOGIES["scaled-chart-valkey"])
    valkey = r.one("StatefulSet")
    (container,) = valkey["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--save") + 1] == ""
    service = r.one("Service", f"{FULLNAME}-valkey")
    assert service["spec"]["selector"].items() <= _labels(valkey).items()
    url = f"redis://{FULLNAME}-valkey.{NAMESPACE}.svc:6379/0"
    engine_env = env_of(_deployment(r, "server")["spec"]["template"]["spec"]["containers"][0])
    assert engine_env["KVGATE_SHARED_TIER_URL"]["value"] == url
    assert engine_env["KVGATE_EVENTS_URL"]["value"] == url
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_an_external_valkey_url_stays_in_the_secret() -> None:
    r = render(TOPOLOGIES["scaled-external-valkey"])
    assert not r.of_kind("StatefulSet")
    secret = r.one("Secret", FULLNAME)
    assert base64.b64decode(secret["data"]["valkey-url"]).decode() == VALKEY_URL
    assert base64.b64decode(secret["data"]["shared-tier-secret"]).decode() == "mac-key"
    for component in ("server", "router"):
        (c,) = _deployment(r, component)["spec"]["template"]["spec"]["containers"]
        for e in c["env"]:
            assert "v4lkey" not in str(e.get("value", ""))
    env = env_of(_deployment(r, "server")["spec"]["template"]["spec"]["containers"][0])
    assert env["KVGATE_SHARED_TIER_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": FULLNAME, "key": "valkey-url"}
    assert env["KVGATE_SHARED_TIER_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == \
        "shared-tier-secret"


def test_an_existing_secret_supplies_the_valkey_url_and_mac_key() -> None:
    r = render(TOPOLOGIES["existing-secret"])
    env = env_of(_deployment(r, "server")["spec"]["template"]["spec"]["containers"][0])
    assert env["KVGATE_SHARED_TIER_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "creds", "key": "valkey"}
    assert env["KVGATE_SHARED_TIER_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "creds", "key": "mac"}


def test_shared_tier_settings_are_flags_kvgate_serve_reads() -> None:
    data = render(TOPOLOGIES["scaled-chart-valkey"]).one("ConfigMap", FULLNAME)["data"]
    known = {"KVGATE_" + name.upper() for name in names(Settings)}
    shared = {k for k in data if k.startswith("KVGATE_SHARED_TIER_")}
    assert shared and shared <= known
    assert {"KVGATE_REPLICA_ID", "KVGATE_EVENTS_URL", "KVGATE_SHARED_TIER_URL",
            "KVGATE_SHARED_TIER_SECRET"} <= known


def test_only_routers_reach_the_engines_and_only_the_release_reaches_valkey() -> None:
    r = render(TOPOLOGIES["scaled-chart-valkey"])
    engine, router = _labels(_deployment(r, "server")), _labels(_deployment(r, "router"))
    valkey = _labels(r.one("StatefulSet"))
    engines_policy = r.one("NetworkPolicy", f"{FULLNAME}-engines")
    assert engines_policy["spec"]["podSelector"]["matchLabels"].items() <= engine.items()
    api, metrics = engines_policy["spec"]["ingress"]
    assert [p["port"] for p in api["ports"]] == ["http"]
    (peer,) = api["from"]
    assert peer["podSelector"]["matchLabels"].items() <= router.items()
    assert not peer["podSelector"]["matchLabels"].items() <= engine.items()
    assert [p["port"] for p in metrics["ports"]] == ["metrics"]
    valkey_policy = r.one("NetworkPolicy", f"{FULLNAME}-valkey")
    assert valkey_policy["spec"]["podSelector"]["matchLabels"].items() <= valkey.items()
    (rule,) = valkey_policy["spec"]["ingress"]
    selectors = [p["podSelector"]["matchLabels"] for p in rule["from"]]
    assert any(s.items() <= engine.items() for s in selectors)
    assert any(s.items() <= router.items() for s in selectors)
    assert all(s.get("app.kubernetes.io/instance") == "kvg" for s in selectors)
    assert "namespaceSelector" not in str(rule)


def test_router_autoscaling_on_request_rate_with_cpu_beside_it() -> None:
    hpa = render(TOPOLOGIES["scaled-external-valkey"]).one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-router"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] == "kvgate_router_requests_per_second"
    assert kinds["Pods"]["pods"]["target"]["averageValue"] == "40"
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    cpu_only = render({**SCALED, "router": {"enabled": True, "autoscaling": {"enabled": True}}})
    (metric,) = cpu_only.one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert "replicas" not in _deployment(cpu_only, "router")["spec"]


def test_keda_scales_the_engines_on_an_exported_queue_depth() -> None:
    r = render(TOPOLOGIES["keda"])
    scaled = r.one("ScaledObject")
    engine = _deployment(r, "server")
    assert scaled["spec"]["scaleTargetRef"]["name"] == engine["metadata"]["name"]
    assert "replicas" not in engine["spec"]  # KEDA's HPA owns the count
    (trigger,) = scaled["spec"]["triggers"]
    assert "kvgate_engine_queue_depth" in trigger["metadata"]["query"]
    assert "kvgate_engine_queue_depth" in registry_metrics()


@pytest.mark.parametrize("values, message", [
    ({"router": {"enabled": True}}, "database.url"),
    ({"replicaCount": 3, "valkey": {"deploy": True}}, "database.url"),
    ({"sharedTier": {"enabled": True}}, "sharedTier.enabled needs a Valkey"),
    ({"valkey": {"url": VALKEY_URL, "deploy": True}}, "not both"),
    ({**SCALED, "keda": {"enabled": True}, "autoscaling": {"enabled": True}}, "Keep one"),
    ({"keda": {"enabled": True}}, "keda.enabled"),
    ({"existingSecret": {"name": "creds"}, "valkey": {"url": VALKEY_URL}}, "valkeyUrlKey"),
    ({**SCALED, "router": {"enabled": True, "autoscaling": {
        "enabled": True, "targetCPUUtilizationPercentage": None}}}, "needs a metric"),
    ({**SCALED, "database": {"url": ""}, "existingSecret": {
        "name": "creds", "databaseUrlKey": "db", "valkeyUrlKey": "valkey"}},
     "existingSecret.eventsSecretKey"),
    ({**SCALED, "database": {"url": ""}, "valkey": {"deploy": True},
      "router": {"enabled": True, "eventsSecret": "x"},
      "existingSecret": {"name": "creds", "databaseUrlKey": "db",
                         "eventsSecretKey": "events"}}, "router.eventsSecret"),
])
def test_contradictory_scale_out_values_fail_and_say_what_to_set(values: dict[str, Any],
                                                                 message: str) -> None:
    with pytest.raises(HelmRenderError) as err:
        render(values)
    assert message in str(err.value)


def test_engines_and_routers_sign_and_check_cache_events_with_one_secret() -> None:
    """Unsigned events are refused by kvgate, so the chart always provides the key: the
    one given, else one it generates (kept across upgrades from the live Secret)."""
    for name, values, secret, key in [
        ("generated", TOPOLOGIES["scaled-chart-valkey"], FULLNAME, "events-secret"),
        ("given", {**TOPOLOGIES["scaled-external-valkey"],
                   "router": {"enabled": True, "eventsSecret": "ev-key"}},
         FULLNAME, "events-secret"),
        ("existing, the shared tier's", TOPOLOGIES["existing-secret"], "creds", "mac"),
        ("existing, its own", {**TOPOLOGIES["existing-secret"], "existingSecret": {
            **TOPOLOGIES["existing-secret"]["existingSecret"], "eventsSecretKey": "ev"}},
         "creds", "ev"),
    ]:
        r = render(values)
        refs = []
        for component in ("server", "router"):
            (c,) = _deployment(r, component)["spec"]["template"]["spec"]["containers"]
            env = env_of(c)
            assert "KVGATE_EVENTS_URL" in env, (name, component)
            refs.append(env["KVGATE_EVENTS_SECRET"]["valueFrom"]["secretKeyRef"])
        assert refs[0] == refs[1] == {"name": secret, "key": key}, name
        if secret == FULLNAME:
            data = r.one("Secret", FULLNAME)["data"]
            value = base64.b64decode(data["events-secret"]).decode()
            assert value == "ev-key" if name == "given" else len(value) >= 40
    # no router, no events: no key
    r = render(TOPOLOGIES["single-shared-tier"])
    env = env_of(_deployment(r, "server")["spec"]["template"]["spec"]["containers"][0])
    assert "KVGATE_EVENTS_SECRET" not in env
    assert "events-secret" not in r.one("Secret", FULLNAME)["data"]


def test_router_settings_the_chart_passes_are_ones_kvgate_route_reads() -> None:
    from kvgate.gateway.route.settings import RouterSettings

    r = render({**TOPOLOGIES["scaled-chart-valkey"],
                "router": {"enabled": True, "reconcileIntervalSeconds": 60}})
    (c,) = _deployment(r, "router")["spec"]["template"]["spec"]["containers"]
    plain = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert plain["KVGATE_RECONCILE_INTERVAL_S"] == "60"
    settings = RouterSettings.from_env({**plain, "KVGATE_EVENTS_SECRET": "s"})
    assert settings.routing.reconcile_interval_s == 60.0 and settings.events.events_secret == "s"


def test_schema_rejects_a_valkey_url_that_is_not_redis() -> None:
    with pytest.raises(Exception) as err:
        render({"valkey": {"url": "http://valkey:6379"}})
    assert "/valkey/url" in str(err.value)
