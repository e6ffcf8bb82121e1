"""Real Locust runs (headless, short) of loadtest/hrnet.py against the real local Triton cpu_server."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from hrnet_core.contract import DEFAULT_PREPROCESS

TRIVIAL = Path(__file__).resolve().parents[1] / "loadtest" / "trivial_repository" / "trivial"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_headless_run_reports_requests_without_failures(cpu_server, tmp_path, protocol, run_locust, aggregated):
    prefix = tmp_path / "run"
    run = run_locust(
        [
            "--host",
            cpu_server.http_url,
            "--grpc-port",
            str(cpu_server.ports.grpc),
            "--protocol",
            protocol,
            "--headless",
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "8s",
            "--batch-size",
            "2",
            "--csv",
            str(prefix),
            "--html",
            str(tmp_path / "report.html"),
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    row = aggregated(prefix)
    assert int(row["Request Count"]) >= 2 and int(row["Failure Count"]) == 0
    assert float(row["50%"]) > 0 and float(row["95%"]) >= float(row["50%"])
    with open(f"{prefix}_stats.csv", newline="") as fh:
        names = {(r["Type"], r["Name"]) for r in csv.DictReader(fh)}
    assert (protocol.upper(), "HRNet_W18_C") in names
    assert "images/s answered" in run.stderr and (tmp_path / "report.html").stat().st_size > 10_000
    assert "Traceback" not in run.stderr


def test_server_top_k_answers_are_checked_and_pass_with_preprocessing_in_the_loop(
    cpu_server, tmp_path, run_locust, aggregated
):
    run = run_locust(
        [
            "--host",
            cpu_server.http_url,
            "--headless",
            "-u",
            "1",
            "-t",
            "5s",
            "--top-k",
            "5",
            "--preprocess-in-loop",
            "--csv",
            str(tmp_path / "k"),
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(aggregated(tmp_path / "k")["Failure Count"]) == 0


def test_crossed_p95_threshold_exits_non_zero(cpu_server, tmp_path, run_locust):
    run = run_locust(
        ["--host", cpu_server.http_url, "--headless", "-u", "1", "-t", "4s", "--max-p95-ms", "1"], tmp_path
    )
    assert run.returncode == 3
    assert "threshold crossed: p95 latency" in run.stderr and "> --max-p95-ms 1" in run.stderr


def test_distributed_master_and_worker_share_the_load(cpu_server, tmp_path, aggregated, free_ports, locust_command):
    port = free_ports().http
    common = ["--host", cpu_server.http_url]
    master = subprocess.Popen(
        [
            *locust_command,
            *common,
            "--master",
            "--master-bind-port",
            str(port),
            "--headless",
            "--expect-workers",
            "1",
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "8s",
            "--csv",
            str(tmp_path / "dist"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = subprocess.Popen(
        [*locust_command, *common, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, master_err = master.communicate(timeout=120)
        worker.communicate(timeout=60)
    finally:
        for proc in (master, worker):
            if proc.poll() is None:
                proc.kill()
    assert master.returncode == 0, master_err[-3000:]
    row = aggregated(tmp_path / "dist")
    assert int(row["Request Count"]) >= 2 and int(row["Failure Count"]) == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "HRNet_W99_C"], "it serves: HRNet_W18_C, trivial"),
        (["--images", "EMPTY"], "no images there"),
        (["--host", "http://127.0.0.1:PORT"], "no Triton server answers at 127.0.0.1:PORT"),
    ],
    ids=["unknown-model", "empty-folder", "server-down"],
)
def test_bad_setup_is_one_clear_message_not_tracebacks(cpu_server, tmp_path, extra, message, run_locust, free_ports):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("not an image")
    down = str(free_ports().http)
    extra = [a.replace("EMPTY", str(tmp_path / "EMPTY")).replace("PORT", down) for a in extra]
    message = message.replace("PORT", down)
    host = [] if "--host" in extra else ["--host", cpu_server.http_url]
    run = run_locust([*host, *extra, "--headless", "-u", "2", "-t", "5s"], tmp_path)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr and "Greenlet" not in run.stderr


def test_trivial_model_config_is_a_valid_triton_config_with_the_contract():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from hrnet_core.contract import INPUT_NAME, OUTPUT_NAME, PreprocessConfig

    cfg = text_format.Parse((TRIVIAL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (
        cfg.name == "trivial"
        and [i.name for i in cfg.input] == [INPUT_NAME]
        and [o.name for o in cfg.output] == [OUTPUT_NAME]
    )
    assert PreprocessConfig.from_triton_config(cfg) == DEFAULT_PREPROCESS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tiny_payload_against_the_trivial_model_passes_the_answer_checks(
    cpu_server, tmp_path, protocol, run_locust, aggregated
):
    run = run_locust(
        [
            "--host",
            cpu_server.http_url,
            "--grpc-port",
            str(cpu_server.ports.grpc),
            "--protocol",
            protocol,
            "--model",
            "trivial",
            "--payload",
            "tiny",
            "--batch-size",
            "4",
            "--headless",
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "3s",
            "--csv",
            str(tmp_path / "t"),
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    row = aggregated(tmp_path / "t")
    assert int(row["Request Count"]) > 10 and int(row["Failure Count"]) == 0


def test_web_ui_mode_swarms_from_the_form_and_reports(cpu_server, tmp_path, free_ports, locust_command):
    import json
    import time
    import urllib.parse
    import urllib.request

    port = free_ports().http
    proc = subprocess.Popen(
        [*locust_command, "--host", cpu_server.http_url, "--web-host", "127.0.0.1", "--web-port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ui = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(ui, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the web UI never came up"
                time.sleep(0.5)
        form = urllib.parse.urlencode({"user_count": 2, "spawn_rate": 2, "host": cpu_server.http_url}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{ui}/swarm", data=form), timeout=10) as r:
            assert json.load(r)["success"]
        while True:
            with urllib.request.urlopen(f"{ui}/stats/requests", timeout=10) as r:
                stats = {s["name"]: s for s in json.load(r)["stats"]}
            if stats.get("HRNet_W18_C", {}).get("num_requests", 0) >= 2:
                break
            assert time.monotonic() < deadline + 60, f"no requests reported: {stats}"
            time.sleep(1)
        assert stats["HRNet_W18_C"]["num_failures"] == 0
    finally:
        proc.kill()
        proc.communicate()


def test_bench_sweeps_with_locust_and_splits_server_time(cpu_server, tmp_path, capsys):
    from hrnet_triton.cli import main

    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--url",
            cpu_server.http_url,
            "--model",
            "HRNet_W18_C",
            "--batch-sizes",
            "1,2",
            "--concurrency",
            "1,2",
            "--seconds",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with open(out / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["batch_size"], r["concurrency"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    for r in rows:
        assert int(r["requests"]) > 0 and int(r["failures"]) == 0
        assert float(r["images_per_s"]) > 0 and float(r["p99_ms"]) >= float(r["p50_ms"]) > 0
        assert float(r["server_compute_ms"]) > 0 and float(r["server_queue_ms"]) >= 0
        # the server's time per request cannot exceed what the client waited for it
        assert float(r["server_compute_ms"]) + float(r["server_queue_ms"]) < float(r["p99_ms"]) * 1.5
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| batch | concurrency | images/s |" in capsys.readouterr().out


def test_bench_without_a_server_says_so(tmp_path, capsys, free_ports):
    from hrnet_triton.cli import main

    port = free_ports().http
    assert main(["bench", "--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path)]) == 1
    assert f"no Triton server answers at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_options_come_from_locust_environment_variables(cpu_server, tmp_path, run_locust):
    run = run_locust(
        ["--host", cpu_server.http_url, "--headless", "-u", "1", "-t", "3s"], tmp_path, LOCUST_MODEL="HRNet_W99_C"
    )
    assert run.returncode == 2 and "has no model 'HRNet_W99_C'" in run.stderr


def test_step_shape_adds_users_step_by_step(cpu_server, tmp_path, run_locust):
    run = run_locust(
        [
            "--host",
            cpu_server.http_url,
            "--headless",
            "-u",
            "3",
            "-t",
            "8s",
            "--shape",
            "step",
            "--step-users",
            "1",
            "--step-seconds",
            "2.5",
            "--csv",
            str(tmp_path / "s"),
            "--csv-full-history",
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "s_stats_history.csv", newline="") as fh:
        counts = [
            int(r["User Count"]) for r in csv.DictReader(fh) if r["Name"] == "Aggregated" and int(r["User Count"])
        ]
    steps = [c for i, c in enumerate(counts) if i == 0 or c != counts[i - 1]]
    assert steps[:3] == [1, 2, 3], counts
