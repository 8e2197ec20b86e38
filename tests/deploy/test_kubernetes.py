"""The Kubernetes manifests under deploy/kubernetes, checked offline: every core resource against the Kubernetes
API schemas that kubernetes-validate ships (no network, no cluster), and the wiring between them: selectors,
the ReadWriteMany claim, probes on the OIP v2 health routes the app really serves, the scrape annotations,
graceful termination longer than the server's drain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.api import create_app
from service.api.settings import Settings
from service.serving.cpu_budget import budget_from, plan_threads

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest release we claim (native preStop sleep is GA there)


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def core_resources() -> dict[str, dict[str, Any]]:
    kustomization = docs(DEPLOY / "kustomization.yaml")[0]
    out = {}
    for name in kustomization["resources"]:
        for d in docs(DEPLOY / name):
            out[d["kind"]] = d
    return out


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, Any]]:
    return core_resources()


def test_every_file_is_listed_or_is_the_kserve_variant():
    listed = set(docs(DEPLOY / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert (DEPLOY / "kserve" / "inferenceservice.yaml").is_file()


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"])
def test_resource_is_valid_against_the_kubernetes_schema(resources, kind):
    assert kind in resources, sorted(resources)
    kubernetes_validate.validate(resources[kind], K8S_VERSION, strict=True)  # raises ValidationError


def test_a_broken_resource_is_refused_so_the_check_can_fail(resources):
    bad = {**resources["Service"], "spec": {**resources["Service"]["spec"], "ports": [{"port": "eighty"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def pod_spec(resources) -> dict[str, Any]:
    return resources["Deployment"]["spec"]["template"]["spec"]


def test_selectors_claim_and_ports_are_wired(resources):
    dep = resources["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] >= 2
    for sel in (dep["spec"]["selector"]["matchLabels"], resources["Service"]["spec"]["selector"],
                resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert sel.items() <= labels.items()
    pvc = resources["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = pod_spec(resources)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
    [c] = spec["containers"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/var/lib/classmeans/model_store", "/tmp"}
    assert [p["name"] for p in c["ports"]] == ["http"] and c["ports"][0]["containerPort"] == 8000
    assert resources["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["CLASSMEANS_ADMIN_TOKEN"]["valueFrom"]
    # Workers x threads fit the pod: chosen from its CPU limit (cgroup quota) unless set, and never more.
    limit = c["resources"]["limits"]["cpu"]
    cores = int(limit[:-1]) / 1000 if str(limit).endswith("m") else float(limit)
    workers = int(env.get("CLASSMEANS_WORKERS", {}).get("value", 0))
    threads = int(env.get("CLASSMEANS_TORCH_THREADS", {}).get("value", 0))
    plan = plan_threads(budget_from(64, cores, 64).cores, workers, threads)
    assert not plan.oversubscribed and plan.workers * plan.threads <= cores


def test_probes_and_scrape_path_are_routes_the_app_serves(resources):
    paths = set(create_app(Settings(admin_token="x" * 16)).openapi()["paths"])
    [c] = pod_spec(resources)["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ann = resources["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert {"/v2/health/ready", "/v2/health/live", ann["prometheus.io/path"]} <= paths


def test_termination_outlasts_the_drain(resources):
    spec = pod_spec(resources)
    [c] = spec["containers"]
    drain = float({e["name"]: e.get("value") for e in c["env"]}["CLASSMEANS_GRACEFUL_TIMEOUT_S"])
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > drain + pause
    assert resources["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1


def test_kserve_variant_speaks_oip_v2_on_the_shared_store(resources):
    [isvc] = docs(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    pred = isvc["spec"]["predictor"]
    [c] = pred["containers"]
    # The container is a plain core/v1 Container: check it against the schema as part of a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [c], "volumes": pred["volumes"]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    claim = pred["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == resources["PersistentVolumeClaim"]["metadata"]["name"]
