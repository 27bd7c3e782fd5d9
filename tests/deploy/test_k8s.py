"""deploy/k8s: every kustomization renders, every object validates offline (Kubernetes' kinds against the API's
schemas, custom resources against their CRDs), and the objects agree with each other, with the image and with
the rules. How rendering and validation work, and what is skipped where: tests/deploy/k8s.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import ALERTS_FILE, DASHBOARD_FILES, RULES_FILE, promtool, read_yaml
from .k8s import (
    K8S_DIR,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    core_kind,
    crd_sources,
    custom_resource_errors,
    find,
    render,
    validate_core,
)
from .test_static import COMPOSE_CPU_FILE, COMPOSE_FILE, read_compose

ALERT_JOB = "ride"  # the job="ride" of deploy/prometheus/alerts.yml
NAMESPACE = "ride-serve"


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment", "ride-serve")["spec"]["template"]["spec"]


def server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(objects)["containers"]
    return container


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --------------------------------------------------------------------------------------------------------------
# Rendering and schema validation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_renders(path: str) -> None:
    kinds = sorted(obj["kind"] for obj in render(path))
    expected = {
        "overlays/cpu": ["ConfigMap", "Deployment", "PodDisruptionBudget", "PrometheusRule", "ScaledObject"],
        "overlays/gpu": ["ConfigMap", "Deployment", "PodDisruptionBudget", "PrometheusRule", "ScaledObject"],
        "overlays/cpu-hpa": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"],
        "kserve": ["ConfigMap", "InferenceService", "PodMonitor", "PrometheusRule", "ServiceAccount"],
    }[path]
    assert set(expected) <= set(kinds), kinds
    assert all(obj["metadata"].get("namespace") == NAMESPACE for obj in render(path))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kubernetes_objects_validate_strictly(path: str, version: str) -> None:
    objects = [obj for obj in render(path) if core_kind(obj)]
    assert objects
    for obj in objects:
        validate_core(obj, version)


def test_the_core_validator_refuses_a_misspelt_field() -> None:
    """The validation above is real: one unknown field in the Deployment is an error."""
    import kubernetes_validate

    deployment = find(render("overlays/cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"periodSeconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        validate_core(deployment, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize("kind", sorted({s["kind"] for s in crd_sources()}))
def test_custom_resources_validate_against_their_crd(kind: str) -> None:
    found = [(path, obj) for path in KUSTOMIZATIONS for obj in render(path) if obj["kind"] == kind]
    assert found, f"no {kind} in {KUSTOMIZATIONS}"
    for path, obj in found:
        assert custom_resource_errors(obj) == [], f"{path}: {kind} {obj['metadata']['name']}"


def test_the_crd_validator_refuses_a_misspelt_field() -> None:
    scaled = find(render("overlays/cpu"), "ScaledObject")
    scaled["spec"]["minReplicaCont"] = 2
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 16  # a string map in the CRD
    errors = custom_resource_errors(scaled)
    assert any("minReplicaCont" in e for e in errors) and any("threshold" in e for e in errors), errors


def test_every_custom_resource_kind_has_a_pinned_crd() -> None:
    kinds = {obj["kind"] for path in KUSTOMIZATIONS for obj in render(path) if not core_kind(obj)}
    assert kinds == {s["kind"] for s in crd_sources()}


# --------------------------------------------------------------------------------------------------------------
# The Deployment: probes, drain, security, resources, threads
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p in KUSTOMIZATIONS if p.startswith("overlays/")])
def test_probes_drain_and_security(path: str) -> None:
    objects = render(path)
    spec, container = pod_spec(objects), server(objects)
    assert "replicas" not in find(objects, "Deployment")["spec"], "the autoscaler owns the replica count"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz", "warm-up is covered by the startup probe"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Drain: endpoints update during preStop, then SIGTERM and the server's own drain, all within the grace period.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env(container)["RIDE_SHUTDOWN_TIMEOUT_S"])
    assert pre_stop >= 5
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    assert not spec["automountServiceAccountToken"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"], "the only writable path"


def test_the_pod_user_is_the_image_user() -> None:
    dockerfile = (K8S_DIR.parents[1] / "Dockerfile").read_text()
    serve_stage = dockerfile.split("AS serve\n")[-1]
    (user,) = re.findall(r"^USER (\d+):(\d+)$", serve_stage, flags=re.MULTILINE)
    security = pod_spec(render("overlays/cpu"))["securityContext"]
    assert (str(security["runAsUser"]), str(security["runAsGroup"])) == user


@pytest.mark.parametrize("path", [p for p in KUSTOMIZATIONS if p.startswith("overlays/")])
def test_onnxruntime_threads_follow_the_cpu_limit(path: str) -> None:
    container = server(render(path))
    source = env(container)["RIDE_INTRA_OP_THREADS"]["resourceFieldRef"]
    assert source == {"containerName": container["name"], "resource": "limits.cpu", "divisor": "1"}
    limit = str(container["resources"]["limits"]["cpu"])
    assert re.fullmatch(r"\d+", limit), f"a whole CPU count, so that the thread count is the limit: {limit}"
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"]


def test_cpu_and_gpu_overlays() -> None:
    cpu, gpu = server(render("overlays/cpu")), server(render("overlays/gpu"))
    assert cpu["image"] == "ride-serve:cpu" and env(cpu)["RIDE_PROVIDER"] == "cpu"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["image"] == "ride-serve:gpu" and env(gpu)["RIDE_PROVIDER"] == "cuda"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["startupProbe"]["failureThreshold"] > cpu["startupProbe"]["failureThreshold"], "CUDA warms longer"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(render("overlays/gpu"))[
        "tolerations"
    ]
    # The tags are the images the Dockerfile and docker-compose build.
    assert read_compose(COMPOSE_FILE)["services"]["ride"]["image"] == gpu["image"]
    assert read_compose(COMPOSE_CPU_FILE)["services"]["ride"]["image"] == cpu["image"]


@pytest.mark.parametrize("component", ["model-pvc", "model-init"])
def test_model_source_components(component: str, tmp_path: Path) -> None:
    """The documented alternatives to the model in the image render on top of an overlay and validate."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    relative = Path(os.path.relpath(K8S_DIR, overlay))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(relative / "overlays" / "cpu")],
                "components": [str(relative / "components" / component)],
            }
        )
    )
    from .k8s import kubectl

    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for obj in objects:
        if core_kind(obj):
            validate_core(obj, KUBERNETES_VERSIONS[-1])
    container = server(objects)
    model_dir = env(container)["RIDE_MODEL_DIR"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert any(model_dir.startswith(path) and mount.get("readOnly") for path, mount in mounts.items()), mounts
    if component == "model-init":
        (init,) = pod_spec(objects)["initContainers"]
        assert init["command"][-1].rstrip("/") == model_dir


# --------------------------------------------------------------------------------------------------------------
# Service, PDB, monitoring: selectors and names line up
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p in KUSTOMIZATIONS if p.startswith("overlays/")])
def test_selectors_and_ports_line_up(path: str) -> None:
    objects = render(path)
    deployment = find(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = find(objects, "Service")
    assert matches(service["spec"]["selector"], pod_labels)
    assert matches(find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in server(objects)["ports"]}
    monitor = find(objects, "ServiceMonitor")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == ALERT_JOB


def test_prometheus_rule_and_dashboard_are_the_compose_files() -> None:
    result = subprocess.run(
        [sys.executable, str(K8S_DIR / "sync.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    objects = render("overlays/cpu")
    groups = [g for path in (RULES_FILE, ALERTS_FILE) for g in read_yaml(path)["groups"]]
    assert find(objects, "PrometheusRule")["spec"]["groups"] == groups
    dashboards = find(objects, "ConfigMap", "ride-serve-dashboards")
    assert dashboards["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert dashboards["data"] == {path.name: path.read_text() for path in DASHBOARD_FILES}


def test_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": find(render("overlays/cpu"), "PrometheusRule")["spec"]["groups"]}))
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------
# Autoscaling on load: KEDA, the HPA through prometheus-adapter, KServe
# --------------------------------------------------------------------------------------------------------------

QUEUE_QUERY = f'sum(avg_over_time(ride_queue_depth{{job="{ALERT_JOB}", namespace="{NAMESPACE}"}}[1m]))'


def check_promql(expressions: list[str], tmp_path: Path) -> None:
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, expr in enumerate(expressions)]
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", ["overlays/cpu", "overlays/gpu"])
def test_keda_scales_the_deployment_on_queue_depth(path: str, tmp_path: Path) -> None:
    objects = render(path)
    scaled = find(objects, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == find(objects, "Deployment")["metadata"]["name"]
    assert 2 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    # The namespace in the query is the one the overlay deploys to; the metric is what the server exports.
    assert trigger["metadata"]["query"] == QUEUE_QUERY
    assert find(objects, "Deployment")["metadata"]["namespace"] == NAMESPACE
    assert trigger["metadata"]["ignoreNullValues"] == "false" and scaled["fallback"]["replicas"] >= 2
    check_promql([trigger["metadata"]["query"]], tmp_path)


def test_hpa_variant_uses_the_prometheus_adapter_rule(tmp_path: Path) -> None:
    objects = render("overlays/cpu-hpa")
    hpa = find(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ride-serve"}
    (metric,) = hpa["metrics"]
    keda = find(render("overlays/cpu"), "ScaledObject")["spec"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {
        "type": "AverageValue",
        "averageValue": keda["triggers"][0]["metadata"]["threshold"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (keda["minReplicaCount"], keda["maxReplicaCount"])
    assert hpa["behavior"] == keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    (rule,) = read_yaml(K8S_DIR / "components" / "hpa" / "prometheus-adapter-rules.yaml")["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # The adapter's templates filled in as it does for one pod: the result must be PromQL.
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "ride_queue_depth")
        .replace("<<.LabelMatchers>>", 'namespace="ride-serve",pod=~"ride-serve-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    check_promql([query, rule["seriesQuery"]], tmp_path)


def test_kserve_inference_service(tmp_path: Path) -> None:
    objects = render("kserve")
    service = find(objects, "InferenceService")
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    variables = env(container)
    assert container["name"] == "kserve-container" and variables["PROTOCOL"] == "v2"
    assert container["ports"][0]["containerPort"] == int(variables["RIDE_PORT"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (metric,) = predictor["autoScaling"]["metrics"]
    external = metric["external"]
    keda = find(render("overlays/cpu"), "ScaledObject")["spec"]
    assert external["metric"]["query"] == keda["triggers"][0]["metadata"]["query"]
    assert external["target"]["value"] == keda["triggers"][0]["metadata"]["threshold"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (keda["minReplicaCount"], keda["maxReplicaCount"])
    check_promql([external["metric"]["query"]], tmp_path)
    # The PodMonitor finds these pods and names their job as the alerting rules expect.
    monitor = find(objects, "PodMonitor")["spec"]
    assert matches(monitor["selector"]["matchLabels"], predictor["labels"])
    assert predictor["labels"][monitor["jobLabel"]] == ALERT_JOB
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == [container["ports"][0]["name"]]


def test_kserve_pod_fields_are_a_valid_pod_spec() -> None:
    """Without KServe's CRD at hand, what it inlines from the core PodSpec is still checked strictly: the
    predictor's pod fields (all but KServe's own) make a valid Pod."""
    predictor = find(render("kserve"), "InferenceService")["spec"]["predictor"]
    kserve_only = {"minReplicas", "maxReplicas", "autoScaling", "labels", "annotations", "scaleMetric", "scaleTarget"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ride-predictor"},
        "spec": {k: v for k, v in predictor.items() if k not in kserve_only},
    }
    for version in KUBERNETES_VERSIONS:
        validate_core(pod, version)
