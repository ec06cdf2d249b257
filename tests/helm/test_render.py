"""The rendered chart, value set by value set: valid Kubernetes, wired the way kvgate runs."""

from __future__ import annotations

import base64
import copy

import kubernetes_validate
import pytest
from helm_python import HelmRenderError

from kvgate.gateway.config import Settings, names, parse_bytes

from .chart import (
    FULLNAME,
    NAMESPACE,
    PG_URL,
    VALUE_SETS,
    env_of,
    render,
    secret_refs,
    validate_kubernetes,
)

SETS = sorted(VALUE_SETS)


@pytest.fixture(scope="module", params=SETS)
def rendered(request):
    return request.param, render(VALUE_SETS[request.param])


def test_every_object_validates_against_kubernetes_1_30(rendered) -> None:
    _, r = rendered
    kinds = set()
    for obj in r.objects:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: not in Kubernetes' schemas; test_monitoring checks it
        validate_kubernetes(obj)
        assert obj["metadata"]["namespace"] == NAMESPACE
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount",
            "PodDisruptionBudget"} <= kinds


def test_strict_validation_rejects_an_unknown_field() -> None:
    """Control: the validator really is strict, so the test above can fail."""
    deployment = copy.deepcopy(render().one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(deployment)


def test_probes_hit_health_and_readiness_on_the_served_port(rendered) -> None:
    _, r = rendered
    server = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in server["ports"]}["http"]
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["startupProbe"]["httpGet"]["path"] == "/healthz"
    config = r.one("ConfigMap", FULLNAME)["data"]
    assert config["KVGATE_PORT"] == str(port)
    assert config["KVGATE_HOST"] == "0.0.0.0"
    service = r.one("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_graceful_shutdown_drains_within_the_grace_period(rendered) -> None:
    """preStop sleep, then SIGTERM: the server's drain must end before the kubelet kills it."""
    _, r = rendered
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    sleep = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = Settings.from_env(r.one("ConfigMap", FULLNAME)["data"]).http.shutdown_timeout_s
    assert drain >= 30
    assert sleep + drain < pod["terminationGracePeriodSeconds"]


def test_a_grace_period_too_short_to_drain_fails_to_render() -> None:
    with pytest.raises(HelmRenderError, match="terminationGracePeriodSeconds=20"):
        render({"terminationGracePeriodSeconds": 20, "preStopSleepSeconds": 10})


def test_security_context_is_non_root_with_read_only_root(rendered) -> None:
    _, r = rendered
    for pod, container in r.containers():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        # Everything that writes (HOME, model hub and compiler caches) lands on an emptyDir.
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        writable = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in emptydirs}
        env = env_of(container)
        for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TMPDIR"):
            assert any(env[var]["value"].startswith(w) for w in writable), var


def test_config_map_is_exactly_what_kvgate_serve_reads(rendered) -> None:
    """Every KVGATE_* variable names a real setting and parses with the server's own code."""
    name, r = rendered
    data = r.one("ConfigMap", FULLNAME)["data"]
    fields = {f"KVGATE_{name.upper()}" for name in names(Settings)}
    assert set(data) <= fields
    settings = Settings.from_env(data)
    assert settings.http.host == "0.0.0.0"
    assert settings.cache.block_size == 16
    if name == "gpu":
        assert settings.cache.device_cache_bytes == 16 * 1024**3  # 16 GiB, not 1.6e+10
        assert settings.engine.dtype == "bfloat16"
        assert settings.metrics.metrics_tenant_labels is False
    else:
        assert settings.cache.device_cache_bytes == parse_bytes("256MiB")
        assert settings.metrics.metrics_tenant_labels is True


def test_gpu_is_requested_only_when_enabled(rendered) -> None:
    name, r = rendered
    gpus = {"gpu": 1, "model-pvc-autoscaled": 2}.get(name)
    server = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    device = r.one("ConfigMap", FULLNAME)["data"]["KVGATE_DEVICE"]
    if gpus:
        assert server["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert server["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert server["resources"]["limits"]["memory"] == "4Gi"  # the defaults survive
        assert device == "cuda"
    else:
        assert device == "cpu"
    for _, container in r.containers():
        if container is not server or not gpus:
            for section in container.get("resources", {}).values():
                assert "nvidia.com/gpu" not in section


def test_scheduling_values_reach_the_pod() -> None:
    pod = render(VALUE_SETS["gpu"]).one("Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in render().one("Deployment")["spec"]["template"]["spec"]


def test_every_secret_and_config_reference_resolves(rendered) -> None:
    """A pod that names a missing Secret key never starts: check every reference."""
    name, r = rendered
    existing = VALUE_SETS[name].get("existingSecret", {})
    available = {(s["metadata"]["name"], key) for s in r.of_kind("Secret") for key in s["data"]}
    if existing:
        assert not r.of_kind("Secret"), "existingSecret: the chart must create no Secret"
        available |= {(existing["name"], existing["adminKeyKey"]),
                      (existing["name"], existing["databaseUrlKey"])}
    config_maps = {c["metadata"]["name"] for c in r.of_kind("ConfigMap")}
    for _, container in r.containers():
        for _, secret, key in secret_refs(container):
            assert (secret, key) in available
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps
    server = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    refs = {var: (secret, key) for var, secret, key in secret_refs(server)}
    if existing:
        assert refs["KVGATE_ADMIN_KEY"] == ("kvgate-creds", "admin")
        assert refs["KVGATE_DB"] == ("kvgate-creds", "db-url")
        assert "KVGATE_METRICS_KEY" not in refs  # no metricsKeyKey: the port alone guards it
    else:
        assert refs["KVGATE_ADMIN_KEY"] == (FULLNAME, "admin-key")
        assert refs["KVGATE_METRICS_KEY"] == (FULLNAME, "metrics-key")


def test_admin_key_is_created_or_taken_from_values() -> None:
    created = base64.b64decode(render().one("Secret")["data"]["admin-key"]).decode()
    assert len(created) >= 40
    given = render({"adminKey": "kvg-admin-fixed"}).one("Secret")["data"]["admin-key"]
    assert base64.b64decode(given).decode() == "kvg-admin-fixed"


def test_sqlite_default_is_one_replica_on_a_volume_migrated_in_the_pod() -> None:
    r = render()
    deployment = r.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    db = r.one("ConfigMap", FULLNAME)["data"]["KVGATE_DB"]
    assert db == "sqlite:////var/lib/kvgate/kvgate.db"
    claim = r.one("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert db.removeprefix("sqlite:///").startswith(mounts["data"] + "/")
    (init,) = pod["initContainers"]
    assert init["args"] == ["migrate"]
    assert {m["name"] for m in init["volumeMounts"]} >= {"data"}
    assert not r.of_kind("Job")
    assert "KVGATE_DB" not in env_of(pod["containers"][0])


@pytest.mark.parametrize("values", [
    {"replicaCount": 3},
    {"replicaCount": 2, "existingSecret": {"name": "creds"}},
    {"autoscaling": {"enabled": True}},
], ids=["replicas", "existing-secret-without-db", "autoscaling"])
def test_more_than_one_replica_on_sqlite_fails_to_render_and_says_why(values) -> None:
    with pytest.raises(HelmRenderError) as err:
        render(values)
    message = str(err.value)
    assert "shared database" in message
    assert "SQLite" in message
    assert "database.url" in message


def test_postgres_replicas_migrate_in_a_hook_job() -> None:
    r = render(VALUE_SETS["postgres-3-replicas"])
    deployment = r.one("Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"].get("strategy", {}).get("type") != "Recreate"
    assert not r.of_kind("PersistentVolumeClaim")
    assert "KVGATE_DB" not in r.one("ConfigMap", FULLNAME)["data"]
    pod = deployment["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert dict(env_of(pod["containers"][0]))["KVGATE_DB"]["valueFrom"]["secretKeyRef"] == {
        "name": FULLNAME, "key": "database-url"}
    assert base64.b64decode(r.one("Secret", FULLNAME)["data"]["database-url"]).decode() == PG_URL

    job = r.one("Job")
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in hooks["helm.sh/hook-delete-policy"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert container["image"] == pod["containers"][0]["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # Hooks run before the release's own objects exist: the Job must use none of them.
    (_, secret, key), = secret_refs(container)
    hook_secret = r.one("Secret", secret)
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == hooks["helm.sh/hook"]
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        hooks["helm.sh/hook-weight"])
    assert base64.b64decode(hook_secret["data"][key]).decode() == PG_URL
    assert "envFrom" not in container
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]


def test_existing_secret_feeds_the_migration_job() -> None:
    r = render(VALUE_SETS["existing-secret"])
    (container,) = r.one("Job")["spec"]["template"]["spec"]["containers"]
    assert secret_refs(container) == [("KVGATE_DB", "kvgate-creds", "db-url")]


def test_model_from_a_volume_is_mounted_read_only() -> None:
    r = render(VALUE_SETS["model-pvc-autoscaled"])
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert r.one("ConfigMap", FULLNAME)["data"]["KVGATE_MODEL"] == "/models/llama-3.2-1b"
    volume = {v["name"]: v for v in pod["volumes"]}["model"]
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}["model"]
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}

    r = render(VALUE_SETS["model-hostpath"])
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert r.one("ConfigMap", FULLNAME)["data"]["KVGATE_MODEL"] == "/models"
    volume = {v["name"]: v for v in pod["volumes"]}["model"]
    assert volume["hostPath"] == {"path": "/srv/models/qwen", "type": "Directory"}

    # Built-in models: smollm2 (the default, a real model in the image) and demo; no volume.
    for values, model in (({}, "smollm2"), ({"model": {"source": "demo"}}, "demo")):
        r = render(values)
        assert r.one("ConfigMap", FULLNAME)["data"]["KVGATE_MODEL"] == model
        pod = r.one("Deployment")["spec"]["template"]["spec"]
        assert "model" not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize("values, missing", [
    ({"model": {"source": "pvc"}}, "model.pvc.claimName"),
    ({"model": {"source": "hostPath"}}, "model.hostPath.path"),
    ({"existingSecret": {"name": "s"}, "database": {"url": PG_URL}}, "existingSecret"),
])
def test_contradictory_values_fail_with_the_key_to_fix(values, missing) -> None:
    with pytest.raises(HelmRenderError, match=missing.replace(".", r"\.")):
        render(values)


def test_autoscaler_owns_the_replica_count() -> None:
    r = render(VALUE_SETS["model-pvc-autoscaled"])
    deployment = r.one("Deployment")
    assert "replicas" not in deployment["spec"]
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert not render().of_kind("HorizontalPodAutoscaler")


def test_selectors_match_the_pods(rendered) -> None:
    _, r = rendered
    deployment = r.one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"],
                 r.one("Service")["spec"]["selector"],
                 r.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    for job in r.of_kind("Job"):  # migration pods must not receive traffic nor count for the PDB
        job_labels = job["spec"]["template"]["metadata"]["labels"]
        for selector in selectors:
            assert not selector.items() <= job_labels.items()


def test_pod_disruption_budget_never_blocks_a_single_replica_drain() -> None:
    assert render().one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    spec = render({"podDisruptionBudget": {"minAvailable": 2}, "replicaCount": 3,
                   "database": {"url": PG_URL}}).one("PodDisruptionBudget")["spec"]
    assert spec == {"minAvailable": 2, "selector": spec["selector"]}
    assert not render({"podDisruptionBudget": {"enabled": False}}).of_kind("PodDisruptionBudget")


def test_config_change_rolls_the_pods() -> None:
    def checksum(values):
        return render(values).one("Deployment")["spec"]["template"]["metadata"][
            "annotations"]["checksum/config"]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"logLevel": "debug"}})


def test_notes_tell_how_to_reach_it_and_get_the_admin_key() -> None:
    notes = render().notes
    assert f"port-forward svc/{FULLNAME} 8000:8000" in notes
    assert (f"get secret {FULLNAME} -o jsonpath='{{.data.admin-key}}' | base64 -d") in notes
    notes = render(VALUE_SETS["existing-secret"]).notes
    assert "get secret kvgate-creds -o jsonpath='{.data.admin}'" in notes


def test_an_external_database_gets_a_spool_volume_the_server_writes_to() -> None:
    """Usage that cannot reach PostgreSQL waits in KVGATE_SPOOL_DIR: a mounted, writable
    volume (the root filesystem is read-only), an emptyDir unless a claim is named."""
    for claim in ("", "kvgate-spool"):
        values = copy.deepcopy(VALUE_SETS["postgres-3-replicas"])
        values["spool"] = {"existingClaim": claim}
        r = render(values)
        spool_dir = r.one("ConfigMap", FULLNAME)["data"]["KVGATE_SPOOL_DIR"]
        pod = r.one("Deployment")["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert not mounts[spool_dir].get("readOnly")
        (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[spool_dir]["name"]]
        if claim:
            assert volume["persistentVolumeClaim"] == {"claimName": claim}
        else:
            assert volume["emptyDir"] == {}
    # SQLite keeps its spool beside the file, on the data volume.
    assert "KVGATE_SPOOL_DIR" not in render(VALUE_SETS["default"]).one(
        "ConfigMap", FULLNAME)["data"]


def test_the_receipt_key_comes_from_a_secret_every_replica_mounts() -> None:
    r = render({"replicaCount": 3, "database": {"url": PG_URL},
                "receipts": {"keySecret": "kvgate-receipt-key"}})
    deployment = r.one("Deployment")
    validate_kubernetes(deployment)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["receipt-key"]["secret"]["secretName"] == "kvgate-receipt-key"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["receipt-key"]["readOnly"] is True
    path = env_of(container)["KVGATE_RECEIPT_KEY_FILE"]["value"]
    assert path == mounts["receipt-key"]["mountPath"] + "/receipt-key.pem"
    default = render({})
    plain = default.one("Deployment")
    assert "KVGATE_RECEIPT_KEY_FILE" not in env_of(plain["spec"]["template"]["spec"]
                                                   ["containers"][0])


def test_the_disk_tier_gets_its_own_volume_and_settings() -> None:
    r = render({"diskCache": {"enabled": True, "bytes": "2GiB", "sizeLimit": "3Gi"}})
    data = r.one("ConfigMap", FULLNAME)["data"]
    settings = Settings.from_env(data)
    assert settings.disk_tier.disk_cache_dir == "/var/lib/kvgate-kv"
    assert settings.disk_tier.disk_cache_bytes == 2 * 1024**3
    assert settings.disk_tier.disk_cache_write_bandwidth_bytes == 256 * 1024**2
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["disk-cache"] == {
        "name": "disk-cache", "emptyDir": {"sizeLimit": "3Gi"}}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["disk-cache"]["mountPath"] == "/var/lib/kvgate-kv"
    for obj in r.objects:
        validate_kubernetes(obj)
    # off by default: no volume, no setting (the server then has no disk tier)
    r = render({})
    assert "KVGATE_DISK_CACHE_DIR" not in r.one("ConfigMap", FULLNAME)["data"]
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert "disk-cache" not in {v["name"] for v in pod["volumes"]}
