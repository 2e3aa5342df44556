"""deploy/ and docker-compose.yml checked offline: the compose file against the compose-spec
schema (vendored by check-jsonschema), the Kubernetes manifests against the Kubernetes schemas
(shipped by kubernetes-validate), and the Grafana and Prometheus files against the metric
names hashmesh.core.metrics defines. No Docker engine or cluster is needed."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

# Imported for what they register (the balancer's families and per-call metrics), so the
# checks below do not depend on another test having imported them first.
import hashmesh.balancer.collector
import hashmesh.balancer.metrics
import hashmesh.core.metrics  # noqa: F401 - registers the mesh's metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GRACE_SECONDS = 20  # HASHMESH_GRACE_SECONDS in compose and the ConfigMap
PRESTOP_SECONDS = 5
K8S_VERSION = kubernetes_validate.latest_version()
# Labels Prometheus or PromQL add on top of the metrics' own.
TARGET_LABELS = {"job", "instance", "le", "namespace", "pod", "quantile"}
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "info": ("_info",),
    "summary": ("_count", "_sum", ""),
}


@cache
def defined_series() -> dict[str, frozenset[str]]:
    """Every sample name the mesh can expose → its label names (from the live registry)."""
    names: dict[str, frozenset[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("hashmesh_"):
            continue
        # Families built by custom collectors carry their label names even without samples.
        labels: set[str] = set(getattr(family, "_labelnames", ()))
        collector = REGISTRY._names_to_collectors.get(
            family.name
        ) or REGISTRY._names_to_collectors.get(family.name + "_total")
        labels.update(getattr(collector, "_labelnames", ()))
        labels.update(*(s.labels for s in family.samples))
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = frozenset(labels)
    return names


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- docker compose ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema_text = (
        resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    ).read_text()
    schema = json.loads(schema_text)
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose), key=str)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_compose_schema_rejects_a_broken_file() -> None:
    schema = json.loads(
        (
            resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        ).read_text()
    )
    broken = {"services": {"hashd": {"image": "x", "deploy": {"replicas": "three"}, "bogus": 1}}}
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken))


def test_compose_runs_the_whole_mesh_and_scales(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "hashd", "balancer", "workerd", "prometheus", "grafana"} <= set(services)
    assert services["hashd"]["deploy"]["replicas"] == 3
    assert services["workerd"]["deploy"]["replicas"] == 2
    for name in ("hashd", "workerd"):
        # --scale needs no fixed container name and no host port per container.
        assert "container_name" not in services[name]
        assert "ports" not in services[name]
    command = services["balancer"]["command"]
    assert command[command.index("--backends-dns") + 1] == "hashd:50051"
    assert services["hashd"]["environment"]["HASHMESH_HASHD_LISTEN"] == "0.0.0.0:50051"
    assert int(services["hashd"]["environment"]["HASHMESH_GRACE_SECONDS"]) == GRACE_SECONDS
    for name in ("hashd", "balancer", "workerd"):
        grace = services[name]["stop_grace_period"]
        assert int(grace.rstrip("s")) > GRACE_SECONDS, name
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    for mount in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), source


def test_compose_file_is_read_by_compose_v1_too(compose: dict[str, Any]) -> None:
    # docker-compose 1.29 (Debian's) knows only these top-level keys (and x- extensions).
    assert {k for k in compose if not k.startswith("x-")} <= {
        "version",
        "services",
        "volumes",
        "networks",
        "secrets",
        "configs",
    }


def test_compose_sets_argon2_to_fit_its_limits_and_a_healthcheck_per_service(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    hashd = services["hashd"]
    limits = hashd["deploy"]["resources"]["limits"]
    _hashd_settings_fit(hashd["environment"], float(limits["cpus"]), _bytes(limits["memory"]))
    for name in ("hashd", "balancer", "workerd"):
        # Per service, not only the image's HEALTHCHECK (podman drops it without --format docker).
        assert services[name]["healthcheck"]["test"] == ["CMD", "hashmesh-healthcheck"], name
        assert "HASHMESH_HEALTH_TARGET" not in services[name]["environment"], name
    assert services["migrate"]["healthcheck"] == {"disable": True}
    # Images a registry-less machine can replace with locally made ones.
    assert hashd["build"]["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.11-slim}"
    assert services["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:17-alpine}"


def test_dockerfile_builds_offline_from_the_lock_without_the_embedded_database() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    # No frontend image to fetch, nothing only BuildKit understands (classic builder, podman).
    assert "# syntax" not in text and "--mount" not in text
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert "pip install --no-deps -r deploy/requirements.lock" in text
    assert re.search(r"pip install --no-deps /wheels/hashmesh-\*\.whl", text)
    assert "!deploy/requirements.lock" in (DEPLOY / "Dockerfile.dockerignore").read_text()


def test_the_lock_pins_every_runtime_dependency_but_pgserver() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert needed - set(pins) == {"pgserver"}  # the image has no embedded PostgreSQL
    assert not {"pgserver", "fasteners", "platformdirs", "psutil"} & set(pins)
    for requirement in map(Requirement, project["dependencies"]):
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_health_checks_are_not_counted_as_calls_in_error_ratios() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    [ratio] = [
        r["expr"]
        for g in rules["groups"]
        for r in g["rules"]
        if r["alert"] == "HashmeshHighErrorRatio"
    ]
    assert ratio.count('grpc_service!="grpc.health.v1.Health"') == 2  # numerator and denominator
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "hashmesh.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    calls = [e for e in exprs if "hashmesh_grpc_server_handled_total" in e]
    assert calls and all('grpc_service!="grpc.health.v1.Health"' in e for e in calls)


def test_dockerfile_is_multi_stage_non_root_with_a_grpc_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^FROM .* AS builder$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("0", "root"))
    assert re.search(r"^HEALTHCHECK .*", text, re.M)
    assert "hashmesh-healthcheck" in text
    for source in re.findall(r"^COPY (?!--)(\S+) ", text, re.M):
        assert (ROOT / source).exists(), source
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!deploy/healthcheck.py" in ignore


def test_health_probe_script_parses() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)


# --- Kubernetes -------------------------------------------------------------------------------


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_documents(path):
            yield path.name, doc


@cache
def by_kind() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], name_of(doc)): doc for _, doc in manifests()}


def name_of(doc: dict[str, Any]) -> str:
    """``metadata.name``, or the ``generateName`` prefix of a manifest meant for ``create``."""
    return str(doc["metadata"].get("name") or doc["metadata"]["generateName"].rstrip("-"))


@pytest.mark.parametrize(
    ("filename", "doc"),
    list(manifests()),
    ids=[f"{f}:{d['kind']}/{name_of(d)}" for f, d in manifests()],
)
def test_manifest_matches_the_kubernetes_schema(filename: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_schema_rejects_a_broken_manifest() -> None:
    broken = json.loads(json.dumps(by_kind()[("Deployment", "hashd")]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# Manifests applied by hand, never by `kubectl apply -k`: the Secret (an apply would overwrite
# the real one with placeholders) and the on-demand migration Job (its template is immutable).
OUT_OF_BAND = {"secrets.example.yaml", "migrate-job.yaml"}


def test_kustomization_lists_every_manifest_but_the_out_of_band_ones() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - OUT_OF_BAND and present >= OUT_OF_BAND
    applied = [doc for name in listed for doc in load_yaml_documents(K8S / name)]
    assert not [doc for doc in applied if doc["kind"] == "Secret"]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def test_one_secret_holds_the_database_password_once() -> None:
    from urllib.parse import urlsplit

    [secret] = load_yaml_documents(K8S / "secrets.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "hashmesh-secrets"
    assert set(secret["stringData"]) == {
        "POSTGRES_PASSWORD",
        "HASHMESH_CACHE_SECRET",
        "HASHMESH_TASK_KEYS",
        "HASHMESH_IDENTITY_SECRET",
        "HASHMESH_ADMIN_TOKEN",
        "REDIS_PASSWORD",
        "HASHMESH_BALANCER_REDIS_URL",
    }
    referenced = {
        ref["name"]
        for _, doc in manifests()
        for node in _walk(doc)
        if isinstance(node, dict)
        for key, ref in node.items()
        if key in ("secretKeyRef", "secretRef")
    }
    assert referenced == {"hashmesh-secrets"}
    url = by_kind()[("ConfigMap", "hashmesh-config")]["data"]["HASHMESH_DATABASE_URL"]
    assert urlsplit(url).password is None  # from PGPASSWORD, the Secret's one copy
    for name in ("hashd", "balancer", "workerd"):
        env = {e["name"]: e for e in containers(by_kind()[("Deployment", name)])[0]["env"]}
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "hashmesh-secrets",
            "key": "POSTGRES_PASSWORD",
        }


@pytest.mark.parametrize("name", ["hashd", "workerd"])
def test_deployments_an_autoscaler_owns_set_no_replicas(name: str) -> None:
    assert by_kind()[("HorizontalPodAutoscaler", name)]["spec"]["scaleTargetRef"]["name"] == name
    assert "replicas" not in by_kind()[("Deployment", name)]["spec"]


def test_images_are_versioned_and_need_no_registry_once_present() -> None:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "hashmesh", "newTag": version.group(1)}]
    pods = [doc for _, doc in manifests() if doc["kind"] in ("Deployment", "Job")]
    hashmesh = [c for doc in pods for c in containers(doc) if c["image"].startswith("hashmesh")]
    assert len(hashmesh) == 4
    for container in hashmesh:
        assert container["image"] == f"hashmesh:{version.group(1)}"
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_probes_ask_alive_for_liveness_and_serving_for_readiness() -> None:
    from hashmesh.core.rpc import LIVENESS_SERVICE

    for name, live_port, ready_port in (("hashd", 50051, 50051), ("balancer", 50060, 50050)):
        container = containers(by_kind()[("Deployment", name)])[0]
        live, ready = container["livenessProbe"], container["readinessProbe"]
        assert live["grpc"] == {"port": live_port, "service": LIVENESS_SERVICE}, name
        assert ready["grpc"] == {"port": ready_port}, name  # the whole server: can it serve
        # One slow answer does not take a pod out: a few misses, each given a few seconds.
        assert ready["failureThreshold"] >= 2 and ready["timeoutSeconds"] >= 2, name


def test_the_balancer_sees_unready_replicas_too() -> None:
    # Without it DNS lists only ready pods: an unready replica vanishes instead of showing as
    # down (hashmesh_balancer_backend_up 0), and HashmeshReplicasEjected can never fire.
    assert by_kind()[("Service", "hashd")]["spec"]["publishNotReadyAddresses"] is True


def _cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 2**20, "G": 2**30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def _hashd_settings_fit(env: dict[str, str], cpus: float, memory: int) -> None:
    """hashd's own start-up check, run on the limits a manifest gives it: refuses what cannot fit."""
    from hashmesh.core.resources import Resources
    from hashmesh.hashd.config import HashdSettings

    workers = int(env["HASHMESH_HASHD_CPU_WORKERS"])
    limit = Resources(cpus=cpus, memory_bytes=memory, limited=True)
    assert workers == limit.cpu_threads  # one argon2 thread per CPU of the limit
    settings = HashdSettings(
        resources=limit,
        cpu_workers=workers,
        argon2_max_memory_kib=int(env["HASHMESH_HASHD_ARGON2_MAX_MEMORY_KIB"]),
    )
    # What it accepts is what it would derive from the limits on its own.
    assert (
        settings.argon2_memory_limit_kib
        == HashdSettings(resources=limit, cpu_workers=workers).argon2_memory_limit_kib
    )


def test_hashd_argon2_settings_agree_with_the_pod_limits() -> None:
    container = containers(by_kind()[("Deployment", "hashd")])[0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    limits = container["resources"]["limits"]
    _hashd_settings_fit(env, _cpus(limits["cpu"]), _bytes(limits["memory"]))


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def test_hashd_is_discovered_through_a_headless_service() -> None:
    service = by_kind()[("Service", "hashd")]
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"]
        == by_kind()[("Deployment", "hashd")]["spec"]["selector"]["matchLabels"]
    )
    balancer = containers(by_kind()[("Deployment", "balancer")])[0]
    command = balancer["command"]
    assert command[command.index("--backends-dns") + 1] == "hashd:50051"


@pytest.mark.parametrize("name", ["hashd", "balancer", "workerd"])
def test_deployments_drain_within_their_grace_period(name: str) -> None:
    deployment = by_kind()[("Deployment", name)]
    pod = deployment["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= GRACE_SECONDS + PRESTOP_SECONDS
    config = by_kind()[("ConfigMap", "hashmesh-config")]["data"]
    assert int(config["HASHMESH_GRACE_SECONDS"]) == GRACE_SECONDS
    for container in containers(deployment):
        resources_ = container["resources"]
        assert resources_["requests"]["cpu"] and resources_["requests"]["memory"]
        assert resources_["limits"]["memory"]
        live = container["livenessProbe"]
        # A draining pod reports NOT_SERVING; liveness must not kill it before the grace ends.
        assert live["periodSeconds"] * live["failureThreshold"] > grace
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        if name != "workerd":
            assert "grpc" in container["readinessProbe"] and "grpc" in live
    assert ("PodDisruptionBudget", name) in by_kind()


@pytest.mark.parametrize("name", ["hashd", "workerd"])
def test_hashd_and_workerd_autoscale(name: str) -> None:
    hpa = by_kind()[("HorizontalPodAutoscaler", name)]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_migration_job_runs_hashctl_db_migrate_and_can_run_again() -> None:
    job = by_kind()[("Job", "hashmesh-migrate")]
    assert containers(job)[0]["command"] == ["hashctl", "db", "migrate"]
    # `kubectl create -f` names each run afresh: no clash with a finished one within its TTL.
    assert "name" not in job["metadata"] and job["metadata"]["generateName"] == "hashmesh-migrate-"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


# --- Grafana and Prometheus -------------------------------------------------------------------

PROMQL_NAME = re.compile(r"\bhashmesh_[a-z0-9_]+\b")
PROMQL_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
PROMQL_MATCHER = re.compile(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def check_promql(expr: str) -> list[str]:
    """Problems with one expression: unknown hashmesh metrics, labels no metric has."""
    series = defined_series()
    problems = [
        f"unknown metric {name}" for name in PROMQL_NAME.findall(expr) if name not in series
    ]
    known_labels = set().union(*series.values()) | TARGET_LABELS
    used = {
        label.strip()
        for group in PROMQL_BY.findall(expr)
        for label in group.split(",")
        if label.strip()
    }
    used |= set(PROMQL_MATCHER.findall(expr))
    problems += [f"unknown label {label}" for label in used - known_labels]
    return problems


def test_promql_checker_catches_typos() -> None:
    assert check_promql("rate(hashmesh_grpc_server_handled_total[5m])") == []
    assert check_promql("rate(hashmesh_grpc_server_handled[5m])")
    assert check_promql('sum by (client_id) (hashmesh_task_queue_depth{status="pending"})')


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "hashmesh.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_defined_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    problems = {expr: check_promql(expr) for expr in exprs}
    assert not {e: p for e, p in problems.items() if p}
    queried = {name for expr in exprs for name in PROMQL_NAME.findall(expr)}
    for needed in (
        "hashmesh_grpc_server_handled_total",
        "hashmesh_grpc_server_handling_seconds_bucket",
        "hashmesh_task_queue_depth",
        "hashmesh_balancer_backend_up",
    ):
        assert needed in queried


def test_dashboard_json_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DEPLOY / "grafana" / "dashboards" / "hashmesh.json").read_text() == module.render(), (
        "run python deploy/grafana/dashboard.py"
    )
    ids = [p["id"] for p in json.loads(module.render())["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard_folder(compose: dict[str, Any]) -> None:
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/hashmesh.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


def test_prometheus_scrapes_every_daemon_through_dns(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in ("hashd", "balancer", "workerd"):
        sd = jobs[name]["dns_sd_configs"][0]
        assert sd["names"] == [name]
        assert name in compose["services"]
        assert str(sd["port"]) in compose["services"][name]["expose"]
    k8s = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-k8s.yml").read_text())
    assert k8s["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] == "pod"


def test_alert_rules_use_defined_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert exprs
    problems = {expr: check_promql(expr) for expr in exprs}
    assert not {e: p for e, p in problems.items() if p}


def test_balancer_replicas_share_their_rate_limits_through_redis() -> None:
    assert by_kind()[("Deployment", "balancer")]["spec"]["replicas"] >= 2
    url = by_kind()[("Secret", "hashmesh-secrets")]["stringData"]["HASHMESH_BALANCER_REDIS_URL"]
    password = by_kind()[("Secret", "hashmesh-secrets")]["stringData"]["REDIS_PASSWORD"]
    assert url == f"redis://:{password}@redis:6379/0"
    service = by_kind()[("Service", "redis")]
    assert (
        service["spec"]["selector"]
        == by_kind()[("Deployment", "redis")]["spec"]["selector"]["matchLabels"]
    )
    allowed = by_kind()[("NetworkPolicy", "redis")]["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert (
        allowed["matchLabels"]
        == by_kind()[("Deployment", "balancer")]["spec"]["selector"]["matchLabels"]
    )


def test_the_balancer_pod_gets_a_whole_cpu_to_pin_itself_to() -> None:
    # The balancer pins itself to one CPU (HASHMESH_BALANCER_CPUS=auto). A kubelet with the
    # static CPU manager policy gives a container its own cores only when its pod is Guaranteed
    # (requests equal to limits) and asks for whole CPUs.
    config = by_kind()[("ConfigMap", "hashmesh-config")]["data"]
    assert config.get("HASHMESH_BALANCER_CPUS", "auto") == "auto"
    for container in containers(by_kind()[("Deployment", "balancer")]):
        resources_ = container["resources"]
        assert resources_["requests"] == resources_["limits"]
        cpus = _cpus(str(resources_["limits"]["cpu"]))
        assert cpus >= 1 and cpus == int(cpus)
