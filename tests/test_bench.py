"""``hrnet-triton bench`` with perf_analyzer: against the real CPU Triton server (``cpu_server``).

perf_analyzer comes from the tools environment (``make tools-env``); without it these tests skip
with the reason :func:`hrnet_triton.tools.find_tools` gives. The CSV parser is tested on a CSV
that perf_analyzer writes here, checked against the report perf_analyzer prints beside it.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess

import pytest

from hrnet_core.contract import ADMIN_HEADER
from hrnet_core.errors import HrnetTritonError

W18 = "HRNet_W18_C"
# Short count windows, the stability check relaxed: these tests check what is parsed, not how stable this
# shared 2-core machine is.
QUICK = ["--window-requests", "4", "--stability-percentage", "1000", "--max-trials", "3"]


@pytest.fixture(scope="module")
def tools():
    from hrnet_triton.tools import ToolsMissing, find_tools

    try:
        return find_tools()
    except ToolsMissing as err:
        pytest.skip(f"perf_analyzer is not available: {err}")


@pytest.fixture(scope="module")
def captured(tools, cpu_server, tmp_path_factory):
    """One real perf_analyzer run (W18, batch 1, concurrency 1): its CSV and its printed report."""
    from hrnet_core.preprocess import load_tensor
    from hrnet_core.samples import sample_images
    from hrnet_triton.perf import Load, PerfSettings, PerfTarget, perf_command, write_input_data

    work = tmp_path_factory.mktemp("perf")
    data = write_input_data(work / "data.json", "x", [load_tensor(p) for p in sample_images()[:2]], "tensor")
    url = cpu_server.http_url.removeprefix("http://")
    target = PerfTarget(url, "http", W18, 1, data, (f"{ADMIN_HEADER}:{cpu_server.admin_key}",))
    settings = PerfSettings(window_requests=4, stability_percentage=1000, max_trials=3)
    cmd = perf_command(tools.perf_analyzer, target, Load(concurrency=1), settings, work / "pa.csv")
    done = subprocess.run(cmd, env=tools.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return (work / "pa.csv").read_text(), done.stdout


def _reported(stdout: str, label: str) -> float:
    return float(re.search(rf"{label}: ([\d.]+)", stdout).group(1))


def test_the_csv_parser_reads_what_perf_analyzer_printed(captured):
    from hrnet_triton.perf import parse_csv, request_count, window_spread

    text, stdout = captured
    [row] = parse_csv(text)
    assert row.load == 1
    assert row.inferences_per_s == pytest.approx(_reported(stdout, "Throughput"), rel=1e-4)
    for field, label in (("p50_us", "p50 latency"), ("p90_us", "p90 latency"), ("p99_us", "p99 latency")):
        assert getattr(row, field) == _reported(stdout, label)
    server = re.search(r"queue (\d+) usec \+ compute input (\d+) usec \+ compute infer (\d+) usec", stdout)
    assert (row.queue_us, row.compute_input_us, row.compute_infer_us) == tuple(float(v) for v in server.groups())
    assert request_count(stdout) >= 4 and window_spread(stdout) >= 0
    with pytest.raises(HrnetTritonError, match="not a perf_analyzer --verbose-csv report"):
        parse_csv(stdout)  # the printed report is not the CSV


def test_perf_analyzer_point_against_the_real_server_is_sane(tools, cpu_server, tmp_path):
    from hrnet_triton.bench import BenchConfig, Load, check, perf_point, served_inputs
    from hrnet_triton.perf import PerfSettings

    cfg = BenchConfig(
        url=cpu_server.http_url, model=W18, batch_sizes=[2], concurrencies=[2], inputs=["tensor"],
        metrics_url=f"http://127.0.0.1:{cpu_server.ports.metrics}/metrics", admin_key=cpu_server.admin_key,
        perf=PerfSettings(window_requests=4, stability_percentage=1000, max_trials=3),
    )  # fmt: skip
    cfg = check(cfg)
    [served] = served_inputs(cfg, tmp_path)
    point = perf_point(cfg, served, 2, Load(concurrency=2), tmp_path)
    assert point.images_per_s > 0 and point.requests_per_s == pytest.approx(point.images_per_s / 2, rel=1e-3)
    assert 0 < point.p50_ms <= point.p90_ms <= point.p95_ms <= point.p99_ms
    assert point.avg_batch >= 2  # batch-2 requests: the server never runs fewer images at once
    assert point.server_compute_infer_ms > 0 and point.server_queue_ms >= 0 and point.server_compute_input_ms >= 0
    assert point.server_compute_infer_ms < point.p99_ms  # the server's part cannot exceed what the client waited
    assert point.server_cpu_percent > 0 and point.client_cpu_percent > 0  # the server runs on this machine
    assert point.gpu_utilization_percent is None and "no GPU metrics" in point.note  # a CPU server: said, not faked
    assert point.stable is True


def test_bench_runs_both_tools_side_by_side_and_writes_every_output(tools, cpu_server, tmp_path, capsys):
    from hrnet_triton.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--url", cpu_server.http_url, "--model", W18, "--inputs", "tensor", "--batch-sizes", "1"]
    argv += ["--concurrency", "1", "--request-rates", "3", "--seconds", "4", *QUICK, "--slo-ms", "400"]
    argv += ["--metrics-url", f"http://127.0.0.1:{cpu_server.ports.metrics}/metrics"]
    assert main([*argv, "--admin-key", cpu_server.admin_key, "--out", str(out)]) == 0
    with open(out / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["tool"], r["mode"]) for r in rows] == [
        ("perf_analyzer", "concurrency"), ("locust", "concurrency"), ("perf_analyzer", "rate"),
    ]  # fmt: skip
    assert all(float(r["images_per_s"]) > 0 and float(r["p99_ms"]) >= float(r["p50_ms"]) > 0 for r in rows)
    assert rows[2]["request_rate"] == "3.0"
    report = json.loads((out / "bench.json").read_text())
    assert report["context"]["runtime"] and report["context"]["triton_version"] == "2.51.0"
    [comparison] = report["comparison"]
    assert comparison["concurrency"] == 1 and comparison["locust_step_ms"] in (1, 10, 100)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    for heading in ("## perf_analyzer, closed loop", "## Locust, closed loop", "## perf_analyzer, open loop"):
        assert heading in text
    assert "## Locust against perf_analyzer" in text and "perf_analyzer 2.41.1" in text


def test_bench_without_the_tools_says_how_to_get_them(cpu_server, tmp_path, capsys, monkeypatch):
    from hrnet_triton.cli import main

    monkeypatch.setenv("HRNET_TRITON_TOOLS_ENV", str(tmp_path / "no-tools"))
    argv = ["bench", "--url", cpu_server.http_url, "--admin-key", cpu_server.admin_key, "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "perf_analyzer is missing" in err and "make tools-env" in err


def test_comparison_allows_for_locust_rounding_and_flags_real_differences():
    from dataclasses import fields

    from hrnet_triton.bench import Point, locust_step_ms
    from hrnet_triton.perf_report import compare

    assert [locust_step_ms(ms) for ms in (99.4, 100, 999, 1000, 12000)] == [1, 10, 10, 100, 1000]
    blank = dict.fromkeys(f.name for f in fields(Point))

    def point(tool: str, images_per_s: float, p50_ms: float) -> Point:
        values = blank | dict(tool=tool, mode="concurrency", input="tensor", model=W18, batch_size=8, concurrency=2)
        return Point(**values | dict(images_per_s=images_per_s, p50_ms=p50_ms, failures=0, note=""))

    # 1,000 ms against Locust's 1,100 (its 100 ms step): 10% + 50 ms allowed, so within
    [close] = compare([point("perf_analyzer", 10.0, 1000.0), point("locust", 10.5, 1100.0)])
    assert close.agree and close.locust_step_ms == 100
    [far] = compare([point("perf_analyzer", 10.0, 1000.0), point("locust", 8.0, 1000.0)])
    assert not far.agree and far.throughput_ratio == 0.8 and far.why


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--tools", "wrk", "takes perf_analyzer,locust (one or both"),
        ("--request-rates", "0,2", "takes auto, none, or request rates per second"),
        ("--window-seconds", "0", "takes a positive number of seconds"),
        ("--max-trials", "0", "must be at least 1"),
    ],
)
def test_bad_bench_options_are_one_message(option, value, message, capsys):
    from hrnet_triton.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
