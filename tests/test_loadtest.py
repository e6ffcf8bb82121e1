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
    assert (protocol.upper(), "HRNet_W18_C_image") in names  # no --input: the best the server offers
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


def _distributed(
    locust_command: list[str], tmp_path: Path, port: int, master_args: list[str], worker_args: list[str], workers: int
) -> tuple[list[int], list[str]]:
    """A headless master and ``workers`` workers, on this machine: their exit codes and logs, master first."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    master = [*master_args, "--master", "--master-bind-port", str(port), "--headless", "--expect-workers", str(workers)]
    worker = [*worker_args, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
    logs = [tmp_path / f"locust-{i}.log" for i in range(1 + workers)]
    procs: list[subprocess.Popen] = []
    try:
        for args, log in zip([master] + [worker] * workers, logs, strict=True):
            with open(log, "w") as fh:
                procs.append(subprocess.Popen([*locust_command, *args], cwd=tmp_path, env=env, stdout=fh, stderr=fh))
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes, [log.read_text() for log in logs]


def test_distributed_master_and_workers_share_the_load_and_the_target_rate(
    cpu_server, tmp_path, aggregated, free_ports, locust_command
):
    """Two workers, one user each, --target-rps 10 for 8 s: about 80 requests. A worker that paced its
    user at the whole target (10/s each) would send about 160, above the bound of 1.3 x 10 x 8."""
    host = ["--host", cpu_server.http_url]
    args = [*host, "--model", "trivial", "--payload", "tiny", "-u", "2", "-r", "2", "-t", "8s", "--target-rps", "10"]
    codes, logs = _distributed(
        locust_command, tmp_path, free_ports().http, [*args, "--csv", str(tmp_path / "dist")], host, workers=2
    )
    assert codes[0] == 0, logs[0][-3000:]
    row = aggregated(tmp_path / "dist")
    assert int(row["Failure Count"]) == 0, row
    assert 0.4 * 10 * 8 <= int(row["Request Count"]) <= 1.3 * 10 * 8, row
    assert "requests/s (open loop, target 10)" in logs[0]


def test_a_workers_setup_error_is_the_masters_one_message_and_exit_2(cpu_server, tmp_path, free_ports, locust_command):
    """The master does not ask the server; its worker does, and sends it the reason (a Locust message):
    the master logs it and exits 2 ("could not start"), not 3 ("no request was made")."""
    host = ["--host", cpu_server.http_url]
    master = [*host, "--model", "HRNet_W99_C", "-u", "2", "-r", "2", "-t", "30s"]
    codes, logs = _distributed(locust_command, tmp_path, free_ports().http, master, host, workers=1)
    assert codes == [2, 2], logs[0][-3000:]
    errors = [line for line in logs[0].splitlines() if "/ERROR/" in line]
    assert len(errors) == 1 and "a worker cannot start: the server at" in errors[0], errors
    assert "has no model 'HRNet_W99_C'" in errors[0]
    assert "threshold crossed" not in logs[0] and "Traceback" not in logs[0] + logs[1]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "HRNet_W99_C"], "it serves: HRNet_W18_C, HRNet_W18_C_image, HRNet_W18_C_uint8, hrnet_preprocess"),
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
    # the key lets "it serves: …" list the models: the repository index is an admin API
    run = run_locust(
        [*host, *extra, "--headless", "-u", "2", "-t", "5s"], tmp_path, HRNET_TRITON_ADMIN_KEY=cpu_server.admin_key
    )
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
            if stats.get("HRNet_W18_C_image", {}).get("num_requests", 0) >= 2:  # the default input: image
                break
            assert time.monotonic() < deadline + 60, f"no requests reported: {stats}"
            time.sleep(1)
        assert stats["HRNet_W18_C_image"]["num_failures"] == 0
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("protocol,kind", [("http", "tensor"), ("grpc", "uint8")])
def test_each_input_is_sent_and_its_answers_checked(cpu_server, tmp_path, protocol, kind, run_locust, aggregated):
    """--input (here from LOCUST_INPUT) picks the served model; the answers pass the same checks."""
    args = ["--host", cpu_server.http_url, "--grpc-port", str(cpu_server.ports.grpc), "--protocol", protocol]
    args += ["--headless", "-u", "2", "-t", "4s", "--batch-size", "2", "--csv", str(tmp_path / "i")]
    run = run_locust(args, tmp_path, LOCUST_INPUT=kind)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "i_stats.csv", newline="") as fh:
        rows = {r["Name"]: r for r in csv.DictReader(fh)}
    served = {"tensor": "HRNet_W18_C", "uint8": "HRNet_W18_C_uint8"}[kind]
    assert int(rows[served]["Request Count"]) >= 2 and int(rows[served]["Failure Count"]) == 0, rows


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
            f"--admin-key={cpu_server.admin_key}",  # statistics are an admin API; "=": a key may start with "-"
            "--tools",
            "locust",  # perf_analyzer's side: tests/test_bench.py
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


def _refused_run(cpu_server, tmp_path, run_locust, protocol: str, **env: str):
    """HRNet_W18_C sent 1x1-pixel tensors (--payload tiny): the server refuses every request at once."""
    args = ["--host", cpu_server.http_url, "--grpc-port", str(cpu_server.ports.grpc), "--protocol", protocol]
    args += ["--payload", "tiny", "--headless", "-u", "2", "-r", "2", "-t", "4s", "--csv", str(tmp_path / "f")]
    return run_locust(args, tmp_path, **env)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_failed_requests_back_off_and_say_what_the_server_said(cpu_server, tmp_path, protocol, run_locust, aggregated):
    run = _refused_run(cpu_server, tmp_path, run_locust, protocol)
    assert run.returncode == 1, run.stderr[-3000:]
    row = aggregated(tmp_path / "f")
    # Backoff from 100 ms (jitter 0.5-1x), doubling: a user's waits add up to 3.15 s by its 7th
    # request at the earliest, 5.65 s by its 8th; so within -t 4s, at most 7 requests per user.
    # Retrying at once made thousands.
    assert 2 <= int(row["Failure Count"]) == int(row["Request Count"]) <= 2 * 8, row
    assert "goodput 0.0 images/s answered correctly" in run.stderr
    with open(tmp_path / "f_failures.csv", newline="") as fh:
        errors = [r["Error"] for r in csv.DictReader(fh)]
    assert errors and all("RequestFailed(" in e and "unexpected shape for input 'x'" in e for e in errors), errors
    assert "InferenceServerException()" not in run.stderr


def test_failure_backoff_is_an_option_read_from_the_environment(cpu_server, tmp_path, run_locust, aggregated):
    env = {"LOCUST_FAILURE_BACKOFF_MS": "10000", "LOCUST_FAILURE_BACKOFF_MAX_MS": "20000"}
    run = _refused_run(cpu_server, tmp_path, run_locust, "http", **env)
    assert run.returncode == 1, run.stderr[-3000:]
    # each user's first failure makes it wait at least 10 s x 0.5 (jitter), beyond -t 4s
    assert 1 <= int(aggregated(tmp_path / "f")["Request Count"]) <= 2


def test_an_undecodable_image_is_a_setup_error_naming_the_file(cpu_server, tmp_path, run_locust, aggregated):
    import cv2
    import numpy as np

    images = tmp_path / "images"
    images.mkdir()
    jpeg = cv2.imencode(".jpg", np.full((300, 400, 3), 128, np.uint8))[1].tobytes()
    (images / "good.jpg").write_bytes(jpeg)
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "notes.jpg").write_text("not an image, whatever its name says")
    run = run_locust(
        ["--host", cpu_server.http_url, "--images", str(images), "--headless", "-u", "2", "-t", "4s"]
        + ["--csv", str(tmp_path / "b")],
        tmp_path,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "/ERROR/" in line]
    assert len(errors) == 1, errors
    assert "2 of 3 files cannot be used" in errors[0]
    assert f"{images / 'notes.jpg'}: not a decodable image" in errors[0]
    assert f"{images / 'truncated.jpg'}: truncated JPEG" in errors[0]
    assert "Traceback" not in run.stderr and "Greenlet" not in run.stderr
    assert int(aggregated(tmp_path / "b")["Request Count"]) == 0


def test_a_wrong_grpc_port_is_one_setup_error_and_no_request(cpu_server, tmp_path, run_locust, aggregated, free_ports):
    port = free_ports().grpc
    run = run_locust(
        ["--host", cpu_server.http_url, "--protocol", "grpc", "--grpc-port", str(port), "--headless", "-u", "2"]
        + ["-t", "4s", "--csv", str(tmp_path / "g")],
        tmp_path,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "/ERROR/" in line]
    assert len(errors) == 1 and f"no Triton server answers at 127.0.0.1:{port} over grpc" in errors[0], errors
    assert int(aggregated(tmp_path / "g")["Request Count"]) == 0
    assert "Traceback" not in run.stderr


def test_headless_grpc_runs_end_every_time(cpu_server, tmp_path, run_locust):
    """gRPC clients left open or closed twice used to hang the process at exit, 1 run in 3 or so,
    deaf to SIGTERM (docs/loadtest.md). Ten runs in a row must each end, and cleanly."""
    args = ["--host", cpu_server.http_url, "--grpc-port", str(cpu_server.ports.grpc), "--protocol", "grpc"]
    args += ["--model", "trivial", "--payload", "tiny", "--batch-size", "2", "--headless", "-u", "2", "-r", "2"]
    for attempt in range(10):
        try:
            run = run_locust([*args, "-t", "3s"], tmp_path, timeout=3 + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run {attempt + 1} of 10 did not end within 33 s of a 3 s run")
        assert run.returncode == 0, f"run {attempt + 1}: {run.stderr[-3000:]}"
        assert "Traceback" not in run.stderr


# `python -m locust`, with every gRPC channel's closes counted. At exit, before gRPC's own exit hook,
# it collects the garbage and does to each tritonclient still alive what the exit's garbage
# collection would do (its __del__), then prints the count of closes per channel.
_CHANNEL_AUDIT = """
import atexit, gc, itertools, sys
import locust  # gevent's monkey-patching first, as in `python -m locust`
import grpc._channel
import tritonclient.grpc

closes, numbers = {}, itertools.count()
real_init, real_close = grpc._channel.Channel.__init__, grpc._channel.Channel._close

def audit():
    gc.collect()
    for client in [o for o in gc.get_objects() if isinstance(o, tritonclient.grpc.InferenceServerClient)]:
        client.__del__()
    print("channel closes:", sorted(closes.values()), file=sys.stderr, flush=True)

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    if not closes:
        atexit.register(audit)  # registered after gRPC's exit hook, so it runs before it
    self.audit_number = next(numbers)
    closes[self.audit_number] = 0

def close(self):
    closes[self.audit_number] += 1
    real_close(self)

grpc._channel.Channel.__init__, grpc._channel.Channel._close = init, close
from locust.main import main
sys.argv = ["locust", *sys.argv[1:]]
main()
"""


def test_every_grpc_channel_of_a_run_is_closed_exactly_once(cpu_server, tmp_path, locust_command):
    """The root of the hang at exit: under gevent, gRPC counts its open channels, one close each.
    A channel left open, or closed twice (tritonclient's __del__ closes again), leaves the count off
    zero, and the exit's garbage collection then deadlocks on gRPC's lock (docs/loadtest.md)."""
    import sys

    args = ["--host", cpu_server.http_url, "--grpc-port", str(cpu_server.ports.grpc), "--protocol", "grpc"]
    args += ["--model", "trivial", "--payload", "tiny", "--headless", "-u", "2", "-r", "2", "-t", "3s"]
    run = subprocess.run(
        [sys.executable, "-c", _CHANNEL_AUDIT, "-f", locust_command[-1], *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=3 + 30,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    closes = next(line for line in run.stderr.splitlines() if line.startswith("channel closes:"))
    assert closes == "channel closes: [1, 1, 1]", closes  # the setup's client and one per user


def _tiny_trivial_args(cpu_server, tmp_path, seconds: str = "3s") -> list[str]:
    """A short headless run of the trivial model with 1x1-pixel tensors (the harness's own speed)."""
    args = ["--host", cpu_server.http_url, "--grpc-port", str(cpu_server.ports.grpc), "--model", "trivial"]
    return args + ["--payload", "tiny", "--headless", "-u", "2", "-r", "2", "-t", seconds, "--csv", str(tmp_path / "c")]


@pytest.mark.parametrize(
    "extra,types",
    [(["HrnetGrpcUser"], {"GRPC"}), (["--protocol", "both"], {"HTTP", "GRPC"}), ([], {"HTTP"})],
    ids=["class-named", "protocol-both", "default"],
)
def test_the_user_classes_follow_the_command_line_then_protocol(cpu_server, tmp_path, extra, types, run_locust):
    """A User class named on the command line runs (whatever --protocol says); else --protocol picks."""
    run = run_locust([*_tiny_trivial_args(cpu_server, tmp_path), *extra], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "c_stats.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Name"] == "trivial"]
    assert {r["Type"] for r in rows} == types and all(int(r["Failure Count"]) == 0 for r in rows), rows


def test_open_loop_sends_the_target_rate_shared_by_the_users(cpu_server, tmp_path, run_locust, aggregated):
    """--target-rps 20 for 6 s, 2 users: about 115 requests (the users start in the first half second,
    each paced at 10/s). The closed loop sends this trivial model over a thousand a second here
    (docs/loadtest.md), and users each paced at the whole target would send about 230: the bound,
    1.3 x 20 x 6 = 156, leaves room for a late stop on a loaded machine and fails both."""
    run = run_locust([*_tiny_trivial_args(cpu_server, tmp_path, "6s"), "--target-rps", "20"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    count = int(aggregated(tmp_path / "c")["Request Count"])
    assert 0.4 * 20 * 6 <= count <= 1.3 * 20 * 6, count
    assert "requests/s (open loop, target 20)" in run.stderr


# A user paced at --target-rps 2 (one user: 0.5 s apart) fails once and backs off 1-2 s, longer than the
# pacing; once it succeeds, its next pause must be the pacing's again, not 0 (a catch-up request).
_PACING_AFTER_BACKOFF = """
import time
from argparse import Namespace

import locust  # gevent's monkey-patching first, as in `python -m locust`
from locust.env import Environment

from hrnet_loadtest.users import HrnetHttpUser

options = Namespace(target_rps=2.0, failure_backoff_ms=2000.0, failure_backoff_max_ms=2000.0)
user = HrnetHttpUser(Environment(user_classes=[HrnetHttpUser], parsed_options=options))
user.failures_in_row = 1
backoff = user.wait_time()
time.sleep(backoff)
user.failures_in_row = 0
print(backoff, user.wait_time())
"""


def test_the_pacing_after_a_backoff_counts_from_the_wait_made(tmp_path):
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _PACING_AFTER_BACKOFF], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-3000:]
    backoff, paced = map(float, run.stdout.split())
    assert 1.0 <= backoff <= 2.0 and 0.25 <= paced <= 0.5, (backoff, paced)


def test_the_root_locust_conf_is_read_when_locust_runs_there(cpu_server, tmp_path, aggregated):
    """From the repository's root, Locust reads ./locust.conf: the locustfile and -u come from it."""
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    args = ["--host", cpu_server.http_url, "--model", "trivial", "--payload", "tiny", "--headless", "-t", "3s"]
    run = subprocess.run(
        [sys.executable, "-m", "locust", *args, "--csv", str(tmp_path / "conf")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Shape test updating to 2 users" in run.stderr  # users = 2 in locust.conf
    assert int(aggregated(tmp_path / "conf")["Request Count"]) > 0


def test_locust_help_shows_no_locustfile_option_and_the_file_lists_its_own(tmp_path, locust_command):
    """Locust prints --help before it loads the locustfile; `python loadtest/hrnet.py` prints the
    options the web UI shows, each with its help."""
    import sys

    help_ = subprocess.run([*locust_command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--class-picker" in help_.stdout and "--batch-size" not in help_.stdout
    own = subprocess.run([sys.executable, locust_command[-1]], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert own.returncode == 0, own.stderr[-3000:]
    for flag in ("--model", "--protocol {http,grpc,both}", "--batch-size", "--target-rps", "--max-failure-ratio"):
        assert flag in own.stdout, flag
    assert "[env var: LOCUST_BATCH_SIZE]" in own.stdout
