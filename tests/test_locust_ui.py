"""Locust's web UI with loadtest/hrnet.py, for real: a Locust process serving its UI on loopback,
against the real local Triton cpu_server. The UI must list every option of the load test, with its
help, and a run started from its form must use the form's values (read when the users start)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "hrnet.py"


def _hrnet_flags() -> list[str]:
    """The flags of loadtest/hrnet.py's OPTIONS table (read, not imported: importing Locust here
    would monkey-patch this test process with gevent)."""
    import ast

    tree = ast.parse(LOCUSTFILE.read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign) and n.target.id == "OPTIONS")
    return [ast.literal_eval(key) for key in table.keys]


def _get(url: str, post: bool = False) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, data=b"" if post else None), timeout=10) as r:
        return r.read().decode()


def _template_args(ui: str) -> dict:
    """The arguments the UI's page is rendered with (``window.templateArgs``): its form's fields."""
    page = _get(ui + "/")
    start = page.index("window.templateArgs = ") + len("window.templateArgs = ")
    return json.JSONDecoder().raw_decode(page[start:])[0]


@contextmanager
def web_ui(args: list[str], cwd: Path, free_ports, locust_command, codes: list[int] | None = None) -> Iterator[str]:
    """A Locust web UI on a free loopback port; yields its address, and stops the process after
    (SIGTERM, as Ctrl-C or Kubernetes would), appending its exit code to ``codes`` if given."""
    port = free_ports().http
    command = [*locust_command, *args, "--web-host", "127.0.0.1", "--web-port", str(port)]
    log = open(cwd / "locust.log", "w")  # closed below, after the process
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    ui = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(ui + "/")
                break
            except OSError:
                assert proc.poll() is None, (cwd / "locust.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the web UI never came up"
                time.sleep(0.5)
        yield ui
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if codes is not None:
            codes.append(proc.returncode)


def _swarm(ui: str, form: dict) -> None:
    data = urllib.parse.urlencode({k: str(v) for k, v in form.items()}, doseq=True).encode()
    with urllib.request.urlopen(urllib.request.Request(ui + "/swarm", data=data), timeout=10) as r:
        answer = json.load(r)
    assert answer["success"], answer


def _requests_until(ui: str, name: str, method: str, count: int, seconds: float = 60) -> dict[tuple, dict]:
    """Poll the UI's statistics until ``count`` requests of (method, name) are in; all of the run's rows."""
    deadline = time.monotonic() + seconds
    while True:
        stats = json.loads(_get(ui + "/stats/requests"))
        rows = {(s["method"], s["name"]): s for s in stats["stats"] if s["name"] != "Aggregated"}
        if rows.get((method, name), {}).get("num_requests", 0) >= count:
            return rows
        assert time.monotonic() < deadline, f"no {count} {method} requests to {name}: {rows}"
        time.sleep(0.5)


def _stop(ui: str) -> None:
    _get(ui + "/stop", post=True)
    _wait_stopped(ui)


def _wait_stopped(ui: str) -> None:
    deadline = time.monotonic() + 30
    while json.loads(_get(ui + "/stats/requests"))["state"] != "stopped":
        assert time.monotonic() < deadline, "the run did not stop"
        time.sleep(0.5)


def _triton_counts(server, model: str) -> tuple[int, int]:
    """Triton's own count of (successful requests, images) for ``model``: its statistics API."""
    import tritonclient.http as httpclient

    from hrnet_client.served_model import Protocol, admin_headers

    client = httpclient.InferenceServerClient(server.http_url.split("://", 1)[1])
    try:
        stats = client.get_inference_statistics(model, headers=admin_headers(Protocol.HTTP, server.admin_key))
    finally:
        client.close()
    (entry,) = stats["model_stats"]
    return int(entry["inference_stats"]["success"]["count"]), int(entry["inference_count"])


def test_the_web_ui_lists_every_option_with_its_help_and_the_command_lines_values(
    cpu_server, tmp_path, free_ports, locust_command
):
    args = ["--host", cpu_server.http_url, "--model", "trivial", "--batch-size", "3"]
    with web_ui(args, tmp_path, free_ports, locust_command) as ui:
        extra = _template_args(ui)["extra_options"]
    expected = {flag[2:].replace("-", "_") for flag in _hrnet_flags()}
    assert len(expected) >= 18 and expected <= set(extra), sorted(expected - set(extra))
    for dest in expected:
        assert extra[dest]["help_text"], f"--{dest} shows no help in the web UI"
    assert extra["model"]["default_value"] == "trivial" and extra["batch_size"]["default_value"] == 3
    assert extra["protocol"]["choices"] == ["http", "grpc", "both"]


def test_a_run_started_from_the_web_ui_uses_the_forms_values_then_the_next_run_its_own(
    cpu_server, tmp_path, free_ports, locust_command
):
    """First run: gRPC, the trivial model, 3 images per request; second run, same process: HTTP, 2
    per request. Locust's statistics name the protocol and model; Triton's count the images."""
    base = {"user_count": 2, "spawn_rate": 2, "host": cpu_server.http_url, "model": "trivial", "payload": "tiny"}
    with web_ui(["--host", cpu_server.http_url], tmp_path, free_ports, locust_command) as ui:
        for protocol, batch in (("grpc", 3), ("http", 2)):
            requests_before, images_before = _triton_counts(cpu_server, "trivial")
            form = {**base, "protocol": protocol, "grpc_port": cpu_server.ports.grpc, "batch_size": batch}
            _swarm(ui, form)
            rows = _requests_until(ui, "trivial", protocol.upper(), count=5)
            _stop(ui)
            requests_after, images_after = _triton_counts(cpu_server, "trivial")
            assert set(rows) == {(protocol.upper(), "trivial")}, rows  # no other protocol, no other model
            assert rows[(protocol.upper(), "trivial")]["num_failures"] == 0
            sent = requests_after - requests_before
            assert sent >= 5 and images_after - images_before == batch * sent, (sent, images_after - images_before)
            _get(ui + "/stats/reset", post=True)


@pytest.mark.parametrize("shape", ["HrnetShape", "Default"])
def test_the_class_picker_runs_the_class_picked_whatever_the_protocol_option(
    cpu_server, tmp_path, free_ports, locust_command, shape
):
    args = ["--host", cpu_server.http_url, "--class-picker", "--protocol", "http"]
    with web_ui(args, tmp_path, free_ports, locust_command) as ui:
        assert _template_args(ui)["available_user_classes"] == ["HrnetGrpcUser", "HrnetHttpUser"]
        form = {"user_count": 2, "spawn_rate": 2, "host": cpu_server.http_url, "user_classes": "HrnetGrpcUser"}
        form |= {"shape_class": shape, "model": "trivial", "payload": "tiny", "grpc_port": cpu_server.ports.grpc}
        _swarm(ui, form)
        rows = _requests_until(ui, "trivial", "GRPC", count=5)
        _stop(ui)
    assert set(rows) == {("GRPC", "trivial")}, rows


def test_a_bad_run_from_the_web_ui_stops_with_one_message_and_the_ui_takes_the_next(
    cpu_server, tmp_path, free_ports, locust_command
):
    """An unknown model in the form: the run stops, the error is logged once, Locust stays up
    (exiting, as a headless run does, would take the UI away); the next run, corrected, works."""
    base = {"user_count": 2, "spawn_rate": 2, "host": cpu_server.http_url, "payload": "tiny"}
    with web_ui(["--host", cpu_server.http_url], tmp_path, free_ports, locust_command) as ui:
        _swarm(ui, {**base, "model": "HRNet_W99_C"})
        _wait_stopped(ui)
        _swarm(ui, {**base, "model": "trivial"})
        rows = _requests_until(ui, "trivial", "HTTP", count=5)
        _stop(ui)
    log = (tmp_path / "locust.log").read_text()
    assert log.count("has no model 'HRNet_W99_C'") == 1, log[-3000:]
    assert rows[("HTTP", "trivial")]["num_failures"] == 0 and "Traceback" not in log


def test_a_web_ui_closed_before_any_run_exits_0_not_a_crossed_threshold(tmp_path, free_ports, locust_command):
    """No run was started, so there is nothing to judge: "no request was made" fails headless runs only."""
    codes: list[int] = []
    with web_ui(["--host", "http://127.0.0.1:9"], tmp_path, free_ports, locust_command, codes) as ui:
        assert _template_args(ui)["extra_options"]["model"]["default_value"] == "HRNet_W18_C"
    log = (tmp_path / "locust.log").read_text()
    assert codes == [0], log[-3000:]
    assert "threshold crossed" not in log and "Traceback" not in log
