"""The operations kit of k8s/: the alerts (PrometheusRule), the Grafana dashboard, and per-request
gRPC balancing (the headless Service and the client's round_robin).

Checked here without a cluster: the PrometheusRule against the prometheus-operator's schema and
by `promtool check rules` / `promtool test rules`; the dashboard against Grafana's own model
(grafana-foundation-sdk) and for its layout; the PromQL of every alert and every panel in a real
Prometheus scraping the real Triton of the `cpu_server` fixture; and round_robin over two real
Triton servers.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from hrnet_client.served_model import Protocol
from hrnet_client.triton import TritonClassifier
from hrnet_core.errors import HrnetTritonError
from hrnet_triton.server import LocalTritonServer

from k8s_manifests import (
    K8S,
    OVERLAYS,
    SCRAPE_JOB,
    SCRAPE_LABELS,
    container,
    find,
    http_get,
    http_request,
    prometheus_scraping,
    render,
    validate_operator_resource,
)

MONITORING = K8S / "components" / "monitoring"
DASHBOARD = MONITORING / "triton-dashboard.json"
W18, JOB = "HRNet_W18_C", SCRAPE_JOB
NAMESPACE, POD = SCRAPE_LABELS["namespace"], SCRAPE_LABELS["pod"]  # the labels the ServiceMonitor's scrape adds
TRIVIAL_MODEL = Path(__file__).resolve().parents[1] / "loadtest" / "trivial_repository" / "trivial"


def rule_spec() -> dict:
    return yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in rule_spec()["groups"] for r in g["rules"]}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


# -- the PrometheusRule ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheusrule_validates_against_the_operator_schema(overlay):
    rule = find(render(f"overlays/{overlay}"), "PrometheusRule", "triton")
    run = validate_operator_resource("PrometheusRule", rule)
    assert run.returncode == 0 and run.stdout.strip() == "valid", run.stdout + run.stderr
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"  # not a Prometheus duration
    run = validate_operator_resource("PrometheusRule", broken)
    assert run.returncode == 1 and "for" in run.stdout and "pattern" in run.stdout, run.stdout


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed: `apt-get install --no-install-recommends prometheus` (.ci/run does)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules_and_rejects_an_unknown_field(tmp_path):
    """The operator hands the spec to Prometheus as a rule file: promtool parses it as Prometheus will
    (PromQL, templates, durations), and rejects unknown fields, which the schema above lets through."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec()))
    run = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert run.returncode == 0 and f"SUCCESS: {len(alerts())} rules found" in run.stdout, run.stdout + run.stderr
    spec = rule_spec()
    spec["groups"][0]["rules"][0]["severity"] = "warning"  # belongs under labels
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    run = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert run.returncode != 0 and "field severity not found" in run.stderr, run.stdout + run.stderr


def test_alert_unit_tests_pass_and_would_catch_a_changed_threshold(tmp_path):
    """prometheusrule_test.yaml: each alert fires on the series that should fire it, after its `for:`,
    with its labels and annotations, and stays quiet below its threshold, for another model or namespace."""
    shutil.copy(MONITORING / "prometheusrule_test.yaml", tmp_path)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec()))
    run = _promtool("test", "rules", "prometheusrule_test.yaml", cwd=tmp_path)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    spec = rule_spec()
    queue = next(r for r in spec["groups"][0]["rules"] if r["alert"] == "TritonQueueTimeHigh")
    queue["expr"] = queue["expr"].replace("> 0.1", "> 0.2")  # the test's 150 ms would no longer alert
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    run = _promtool("test", "rules", "prometheusrule_test.yaml", cwd=tmp_path)
    assert run.returncode != 0 and "alertname: TritonQueueTimeHigh" in run.stderr, run.stdout + run.stderr


def test_every_alert_has_a_severity_a_for_duration_and_a_runbook_in_the_readme():
    readme = (K8S / "README.md").read_text()
    assert set(alerts()) == {"TritonQueueTimeHigh", "TritonRequestFailuresHigh", "TritonPodsNotReady", "TritonDown"}
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert re.fullmatch(r"\d+m", rule["for"]) and int(rule["for"][:-1]) >= 5, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert f"#### {name}" in readme, f"k8s/README.md has no runbook section for {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rules_and_dashboard_name_the_objects_the_overlay_deploys(overlay):
    """The job label is the metrics Service's name (the ServiceMonitor's default), the namespace and
    Deployment those the overlay renders: a rename must reach the PromQL too."""
    docs = render(f"overlays/{overlay}")
    metrics_service = find(docs, "Service", JOB)
    namespace = metrics_service["metadata"]["namespace"]
    monitor = find(docs, "ServiceMonitor", "triton")
    assert "jobLabel" not in monitor["spec"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    exprs = [r["expr"] for r in alerts().values()] + [t["expr"] for p in panels() for t in p["targets"]]
    assert all(f'job="{JOB}"' in e for e in exprs if "nv_" in e or "up{" in e)
    for expr in exprs:
        assert set(re.findall(r'namespace="([^"]+)"', expr)) <= {namespace}, expr
        assert set(re.findall(r'deployment="([^"]+)"', expr)) <= {
            find(docs, "Deployment", "triton")["metadata"]["name"]
        }
    rule = find(docs, "PrometheusRule", "triton")
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]


# -- the dashboard ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_is_the_committed_json_labelled_for_the_grafana_sidecar(overlay):
    cm = find(render(f"overlays/{overlay}"), "ConfigMap", "triton-grafana-dashboard")
    assert cm["metadata"]["name"] == "triton-grafana-dashboard"  # fixed: no hash, so no stale copy of one uid
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][DASHBOARD.name]) == dashboard()


def _not_kept(original, kept, path: str = "") -> Iterator[str]:
    """Paths of ``original`` that ``kept`` lacks or holds otherwise (defaults ``kept`` adds are fine)."""
    if isinstance(original, dict) and isinstance(kept, dict):
        for key, value in original.items():
            yield from _not_kept(value, kept[key], f"{path}/{key}") if key in kept else [f"{path}/{key}"]
    elif isinstance(original, list) and isinstance(kept, list) and len(original) == len(kept):
        for i, (a, b) in enumerate(zip(original, kept)):
            yield from _not_kept(a, b, f"{path}/{i}")
    elif original != kept:
        yield path


def _through_grafanas_model(dash: dict) -> dict:
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()  # the panels' options and the Prometheus query types
    return json.loads(json.dumps(Dashboard.from_json(dash), default=lambda o: o.to_json()))


def test_dashboard_survives_grafanas_dashboard_model_whole():
    """grafana-foundation-sdk's dashboard model is generated from Grafana's schemas (panels, their
    options and field config, Prometheus queries): it keeps only the fields it knows, so a misspelt
    or unknown field anywhere is lost on the way through it."""
    dash = dashboard()
    assert list(_not_kept(dash, _through_grafanas_model(dash))) == []
    typo = copy.deepcopy(dash)
    typo["panels"][1]["targets"][0]["exp"] = typo["panels"][1]["targets"][0].pop("expr")
    typo["panels"][1]["fieldConfig"]["defaults"]["units"] = "s"
    lost = list(_not_kept(typo, _through_grafanas_model(typo)))
    assert lost == ["/panels/1/fieldConfig/defaults/units", "/panels/1/targets/0/exp"], lost


def test_dashboard_layout_variables_and_queries_are_consistent():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["multi"] and variables["model"]["includeAll"]
    assert {p["id"] for p in dash["panels"]} == set(range(1, len(dash["panels"]) + 1))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) for k in "xywh") and pos["x"] + pos["w"] <= 24, p["title"]
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in panels():
        assert p["type"] == "timeseries" and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["fieldConfig"]["defaults"]["unit"] in {"reqps", "short", "s", "percentunit", "bytes"}
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]) >= 1
        for t in p["targets"]:
            for selector in re.findall(r"nv_inference_\w+\{([^}]*)\}", t["expr"]):
                assert 'model=~"$model"' in selector, (p["title"], t["expr"])  # every per-model series follows
    titles = " ".join(p["title"] for p in panels()).lower()
    for topic in ("inferences", "queue", "p95", "fail", "gpu utilisation", "gpu memory"):
        assert topic in titles


# -- PromQL in a real Prometheus scraping a real Triton ---------------------------------------------


def _grafana(expr: str) -> str:
    """A panel's query as Grafana sends it for namespace hrnet-triton and model HRNet_W18_C (or all)."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('namespace=~"$namespace"', f'namespace=~"{NAMESPACE}"')
        .replace('model=~"$model"', 'model=~".+"')
    )


def _drive(server: LocalTritonServer, tmp_path: Path) -> None:
    """Traffic that fills every panel: 80 tensors, 4 in flight on the 2 instances (they queue), and
    over gRPC a few images for HRNet_W18_C_image, one of them not an image (a failed request)."""
    with TritonClassifier(server.http_url.removeprefix("http://"), W18, input="tensor", concurrency=4) as client:
        client.run_batches([np.zeros((1, 3, 224, 224), np.float32)] * 80)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    grpc = f"127.0.0.1:{server.ports.grpc}"
    with TritonClassifier(grpc, W18, Protocol.GRPC, input="image") as client:
        predictions = client.classify_files([bad], k=1)
    assert predictions[0].error and "not a decodable image" in predictions[0].error


def _series_by_model(result: list) -> dict[str, float]:
    return {s["metric"].get("model", ""): float(s["value"][1]) for s in result}


@pytest.fixture(scope="module")
def scraped(cpu_server, tmp_path_factory, free_ports):
    """The cpu_server's Triton under load, scraped by a real Prometheus that evaluates the shipped
    alerts; yields (query, Triton's metrics text) once the load is over and scraped."""
    tmp_path = tmp_path_factory.mktemp("prometheus")
    with prometheus_scraping(cpu_server.ports.metrics, tmp_path, free_ports().http, rules=rule_spec()) as query:
        time.sleep(2.5)  # samples before the load: the rate windows' baseline
        _drive(cpu_server, tmp_path)
        time.sleep(3)  # scraped, and the rules evaluated, after the last request
        yield query, http_get(f"http://127.0.0.1:{cpu_server.ports.metrics}/metrics")[1]


def test_dashboard_variables_list_the_served_namespace_and_models(scraped):
    """label_values(metric, label), as Grafana's Prometheus data source asks it: the series API."""
    query, _ = scraped
    for variable in dashboard()["templating"]["list"][1:]:
        metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
        match = metric.replace('namespace=~"$namespace"', f'namespace=~"{NAMESPACE}"')
        series = json.loads(http_get(f"{query.api}/series?{urllib.parse.urlencode({'match[]': match})}")[1])["data"]
        found = {s[label] for s in series}
        assert {"namespace": NAMESPACE, "model": W18}[variable["name"]] in found, (match, found)


def test_every_dashboard_query_returns_the_served_models_series(scraped):
    """Each panel's PromQL, as Grafana sends it, in Prometheus over the real scrape: per-model panels
    have a finite series for HRNet_W18_C, per-pod ones a series of the pod. GPU panels are the
    exception on this machine: it has no GPU, so Triton exports no nv_gpu_* series to find."""
    query, metrics = scraped
    gpu_here = "nv_gpu_utilization{" in metrics
    for p in panels():
        for t in p["targets"]:
            result = query(_grafana(t["expr"]))
            if "nv_gpu_" in t["expr"] and not gpu_here:
                assert result == [], (p["title"], result)
                continue
            assert result, f"{p['title']}: no series for {_grafana(t['expr'])}"
            if 'model=~"$model"' in t["expr"]:
                values = _series_by_model(result)
                assert W18 in values and math.isfinite(values[W18]), (p["title"], t["expr"], values)
            else:
                assert all(s["metric"]["pod"] == POD for s in result), (p["title"], result)


def test_dashboard_values_agree_with_each_other_and_with_the_load(scraped):
    query, _ = scraped

    def value(title: str, target: int = 0, model: str = W18) -> float:
        (panel,) = [p for p in panels() if p["title"] == title]
        return _series_by_model(query(_grafana(panel["targets"][target]["expr"])))[model]

    assert value("Inferences per second") > 0
    assert value("Executions per second and mean batch size", 1) >= 1  # images per execution
    queue, compute = value("Queue and compute time per request"), value("Queue and compute time per request", 1)
    assert queue > 0.01 and compute > 0.01  # 4 in flight on 2 instances: requests waited for each other
    assert value("p95 queue and compute time (worst pod)") >= queue * 0.5
    # The one undecodable image failed its request: the image ensemble's failure ratio is above 0.
    failures = _series_by_model(
        query(_grafana(next(p for p in panels() if p["title"] == "Failure ratio")["targets"][0]["expr"]))
    )
    assert failures[W18] == 0 and 0 < failures[f"{W18}_image"] <= 1, failures


def test_alerts_evaluate_in_prometheus_and_fire_exactly_as_their_values_say(scraped):
    """The rules run in the real Prometheus without error; for the served model, each Triton alert's
    value (its expression without the threshold) exists, and the alert is pending exactly when the
    value is over the threshold (`for:` keeps it from firing within this test)."""
    query, _ = scraped
    groups = json.loads(http_get(f"{query.api}/rules")[1])["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == set(alerts())
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules.values()), rules
    firing = json.loads(http_get(f"{query.api}/alerts")[1])["data"]["alerts"]
    active = {(a["labels"]["alertname"], a["labels"].get("model")): a["state"] for a in firing}
    for name in ("TritonQueueTimeHigh", "TritonRequestFailuresHigh"):
        expr = alerts()[name]["expr"]
        value_expr, threshold = re.fullmatch(r"(.+)\s>\s([\d.]+)\s*", expr, re.DOTALL).groups()
        values = _series_by_model(query(value_expr))
        assert W18 in values, (name, values)
        for model, v in values.items():
            assert active.get((name, model)) == ("pending" if v > float(threshold) else None), (name, model, v)
    # Triton is scraped, so TritonDown is quiet; TritonPodsNotReady needs kube-state-metrics, which no
    # cluster runs here: prometheusrule_test.yaml tests it.
    assert not any(name == "TritonDown" for name, _ in active)


# -- gRPC: one channel, requests spread over servers --------------------------------------------


@pytest.fixture(scope="module")
def two_servers(serve_env, free_ports, tmp_path_factory):
    """Two real Triton servers serving the trivial model on loopback (the pods behind a headless
    Service), with the Deployment's gRPC connection-age flags, the age cut to 1 s for the test."""
    root = tmp_path_factory.mktemp("two")
    shutil.copytree(TRIVIAL_MODEL, root / "repo" / "trivial")
    age_flags = [a for a in container(find(render("overlays/gpu"), "Deployment", "triton"))["args"] if "age" in a]
    assert [a.split("=")[0] for a in age_flags] == ["--grpc-max-connection-age", "--grpc-max-connection-age-grace"]
    servers = []
    for ports in (free_ports(), free_ports()):
        args = [
            f"--model-repository={root / 'repo'}",
            *(f"--{kind}-address=127.0.0.1" for kind in ("http", "grpc", "metrics")),
            f"--http-port={ports.http}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}",
            "--grpc-max-connection-age=1000",
            age_flags[1],
        ]
        servers.append(LocalTritonServer(root / "repo", serve_env=serve_env, ports=ports, args=args))
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _counts(servers: list[LocalTritonServer]) -> list[int]:
    """Each server's count of inferences of the trivial model, from its statistics API (admin key)."""
    answers = [http_request(f"{s.http_url}/v2/models/trivial/stats", admin_key=s.admin_key) for s in servers]
    assert all(status == 200 for status, _ in answers), answers
    return [int(json.loads(body)["model_stats"][0]["inference_count"]) for _, body in answers]


@pytest.mark.parametrize("round_robin", [True, False], ids=["round-robin", "pick-first"])
def test_grpc_round_robin_spreads_one_lanes_requests_over_every_server(two_servers, round_robin):
    """One lane (one gRPC channel) and a target listing both servers, as a headless Service's DNS name
    resolves to every pod: with --grpc-round-robin both servers answer, about half each, also after the
    servers closed the connections at their maximum age; without it (gRPC's default, pick_first) one
    server answers them all, as through a ClusterIP Service."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.ports.grpc}" for s in two_servers)
    before = _counts(two_servers)
    with TritonClassifier(
        target, "trivial", Protocol.GRPC, input="tensor", concurrency=1, grpc_round_robin=round_robin
    ) as client:
        client.run_batches([np.zeros((1, 3, 224, 224), np.float32)] * 10)
        time.sleep(2.5)  # past the servers' connection age: each closed the connection (GOAWAY)
        client.run_batches([np.zeros((1, 3, 224, 224), np.float32)] * 10)
    served = [a - b for a, b in zip(_counts(two_servers), before)]
    assert sum(served) == 20
    if round_robin:  # reconnecting restarts the rotation, so not exactly 10 and 10
        assert min(served) >= 5, served
    else:
        assert sorted(served) == [0, 20], served


def test_round_robin_is_refused_where_it_cannot_work():
    with pytest.raises(HrnetTritonError, match="gRPC's"):
        TritonClassifier("127.0.0.1:1", "trivial", Protocol.HTTP, grpc_round_robin=True)
    with pytest.raises(HrnetTritonError, match="registered with one server"):
        TritonClassifier("ipv4:127.0.0.1:1", "trivial", Protocol.GRPC, shared_memory=True, grpc_round_robin=True)


def test_triton_closes_grpc_connections_at_the_maximum_age_so_clients_resolve_again(two_servers):
    """--grpc-max-connection-age: after it the server closes the connection, and the client's next
    request goes out on a new one (the moment a channel resolves a dns:/// name again)."""
    import psutil  # Locust's dependency

    server = two_servers[0]

    def local_ports() -> set[int]:
        mine = psutil.Process().net_connections(kind="tcp")
        return {c.laddr.port for c in mine if c.raddr and c.raddr.port == server.ports.grpc}

    with TritonClassifier(f"127.0.0.1:{server.ports.grpc}", "trivial", Protocol.GRPC, input="tensor") as client:
        client.run_batches([np.zeros((1, 3, 224, 224), np.float32)])
        first = local_ports()
        time.sleep(2.5)  # past the 1 s age
        client.run_batches([np.zeros((1, 3, 224, 224), np.float32)])
        second = local_ports()
    assert first and second and not first & second, (first, second)
