"""``hrnet-triton bench``: perf_analyzer and Locust, side by side, over input, batch size and load.

Each point of the sweep is one input kind (``--inputs``: tensor, uint8 or image;
:mod:`hrnet_client.inputs`), one batch size and one load, measured by each of ``--tools``:

- **perf_analyzer** (:mod:`hrnet_triton.perf`), NVIDIA's load generator: the closed-loop
  concurrency sweep and an open-loop request-rate sweep, repeated until stable, with p50/p90/p95/p99
  at microsecond resolution and the server's queue / compute input / infer / output split.
- **Locust** (``loadtest/hrnet.py``, one headless run per point, ``-u`` = concurrency), for what
  only it does: every answer checked, load shapes, distributed runs and a web UI. Its percentiles
  are rounded (to 10 ms from 100 ms, to 100 ms from 1 s), which the comparison allows for.

Around every point, whichever tool runs it, the server's statistics give the average batch it
formed (and, for Locust, the split), and :class:`~hrnet_triton.perf_server.ResourceMonitor`
measures the server's CPU and, if its metrics port has them, GPU utilisation and memory.
:mod:`hrnet_triton.perf_report` writes the tables, CSV and JSON; :mod:`hrnet_triton.perf_plot` the plot.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV
from hrnet_core.errors import HrnetTritonError
from hrnet_triton.perf import Load, PerfSettings, PerfTarget, run_perf, write_input_data
from hrnet_triton.perf_server import (
    ResourceMonitor,
    Resources,
    ServerSplit,
    ensemble_steps,
    model_stats,
    server_split,
    snapshot,
    split_between,
)

__all__ = ["BenchConfig", "Point", "model_stats", "server_split", "sweep", "locustfile"]

log = logging.getLogger(__name__)
TOOLS = ("perf_analyzer", "locust")
RATE_FRACTIONS = (0.5, 0.75, 1.0)  # --request-rates auto: of the peak requests/s of the concurrency sweep


def locustfile() -> Path:
    """The Locust file, from the installed ``hrnet_loadtest`` package (a checkout's ``loadtest/``)."""
    from importlib import resources

    return Path(str(resources.files("hrnet_loadtest").joinpath("hrnet.py")))


@dataclass(frozen=True)
class BenchConfig:
    """What one ``bench`` run sweeps, and how."""

    url: str  # the server's HTTP address, http://host:port (statistics and metadata always go over HTTP)
    model: str
    batch_sizes: list[int]
    concurrencies: list[int]
    protocol: str = "http"
    grpc_port: int = 8001
    metrics_url: str | None = None  # default: the url's host, port 8002, /metrics
    inputs: list[str] | None = None  # None: the input the server offers best for ``model``
    request_rates: list[float] | str = "auto"  # "auto": fractions of the concurrency sweep's peak; []: none
    seconds: float = 20.0  # Locust's run per point
    tools: tuple[str, ...] = TOOLS
    perf: PerfSettings = field(default_factory=PerfSettings)
    admin_key: str | None = None

    @property
    def metrics(self) -> str:
        return self.metrics_url or f"http://{urlsplit(self.url).hostname}:8002/metrics"

    @property
    def perf_url(self) -> str:
        parts = urlsplit(self.url)
        return parts.netloc if self.protocol == "http" else f"{parts.hostname}:{self.grpc_port}"


@dataclass(frozen=True)
class Point:
    """One measured point: one tool at one input, batch size and load. None: not measured (see ``note``)."""

    tool: str  # perf_analyzer or locust
    mode: str  # concurrency (closed loop) or rate (open loop)
    input: str  # tensor, uint8 or image
    model: str  # the served model that input went to
    batch_size: int
    concurrency: int | None
    request_rate: float | None  # requests/s asked for (open loop)
    requests: int | None
    failures: int | None
    requests_per_s: float | None
    images_per_s: float | None
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    latency_step_ms: float | None  # the percentiles' resolution: 0.001 (perf_analyzer), Locust's rounding at p50
    avg_batch: float | None  # images per execution the server ran (inference_count / execution_count)
    server_queue_ms: float | None
    server_compute_input_ms: float | None
    server_compute_infer_ms: float | None
    server_compute_output_ms: float | None
    server_compute_ms: float | None  # input + infer + output
    stable: bool | None  # perf_analyzer's stability check passed (None for Locust: it has none)
    server_cpu_percent: float | None  # 100 = one core
    client_cpu_percent: float | None  # the load generator's own CPU (perf_analyzer or Locust)
    gpu_utilization_percent: float | None
    gpu_memory_used_mb: float | None
    note: str = ""


def locust_step_ms(ms: float) -> float:
    """The rounding step of Locust's response-time histogram at ``ms`` (locust.stats.bucket_response_time)."""
    return 1.0 if ms < 100 else 10.0 if ms < 1000 else 100.0 if ms < 10000 else 1000.0


@dataclass(frozen=True)
class Served:
    kind: str  # tensor, uint8 or image
    model: str
    steps: list[str]  # an ensemble's steps, else []
    input_data: Path | None = None  # perf_analyzer's data file


def _measured(
    cfg: BenchConfig, served: Served, batch: int, load: Load, resources: Resources, split: ServerSplit
) -> dict:
    """The fields every point shares: what was measured, the server's split and what it used."""
    return dict(
        mode=load.mode, input=served.kind, model=served.model, batch_size=batch,
        concurrency=load.concurrency, request_rate=load.rate, avg_batch=split.avg_batch,
        server_queue_ms=round(split.queue_ms, 3), server_compute_input_ms=round(split.compute_input_ms, 3),
        server_compute_infer_ms=round(split.compute_infer_ms, 3),
        server_compute_output_ms=round(split.compute_output_ms, 3), server_compute_ms=round(split.compute_ms, 3),
        server_cpu_percent=resources.server_cpu_percent, client_cpu_percent=resources.client_cpu_percent,
        gpu_utilization_percent=resources.gpu_utilization_percent,
        gpu_memory_used_mb=resources.gpu_memory_used_mb,
    )  # fmt: skip


def _locust_command(cfg: BenchConfig, served: Served, batch: int, users: int) -> list[str]:
    options = {
        "--host": cfg.url, "--model": served.model, "--input": served.kind, "--protocol": cfg.protocol,
        "--grpc-port": cfg.grpc_port, "--batch-size": batch, "-u": users, "-r": users, "-t": f"{cfg.seconds:g}s",
        "--max-failure-ratio": 1,
    }  # fmt: skip
    flags = [str(x) for option, value in options.items() for x in (option, value)]
    return [sys.executable, "-m", "locust", "-f", str(locustfile()), "--headless", "--only-summary", *flags]


def locust_point(cfg: BenchConfig, served: Served, batch: int, concurrency: int, work: Path) -> Point:
    """One headless Locust run at ``concurrency`` users, with the server's statistics around it."""
    prefix = work / f"locust-{served.kind}-b{batch}-c{concurrency}"
    models = [served.model, *served.steps]
    before = snapshot(cfg.url, models, cfg.admin_key)
    with ResourceMonitor(cfg.url, cfg.metrics) as monitor:
        cmd = [*_locust_command(cfg, served, batch, concurrency), "--csv", str(prefix)]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    after = snapshot(cfg.url, models, cfg.admin_key)
    if run.returncode != 0:
        tail = "\n".join(line for line in run.stderr.splitlines() if "ERROR" in line)[-2000:]
        raise HrnetTritonError(
            f"Locust failed at input {served.kind}, batch {batch}, concurrency {concurrency} "
            f"(exit {run.returncode}): {tail}"
        )
    with open(f"{prefix}_stats.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    ok_per_s = float(row["Requests/s"]) - float(row["Failures/s"])
    p50 = float(row["50%"])
    return Point(
        tool="locust", requests=int(row["Request Count"]), failures=int(row["Failure Count"]),
        requests_per_s=float(row["Requests/s"]), images_per_s=round(ok_per_s * batch, 3),
        p50_ms=p50, p90_ms=float(row["90%"]), p95_ms=float(row["95%"]), p99_ms=float(row["99%"]),
        latency_step_ms=locust_step_ms(p50), stable=None, note=monitor.result.note,
        **_measured(cfg, served, batch, Load(concurrency=concurrency), monitor.result,
                    split_between(before, after, served.model, served.steps)),
    )  # fmt: skip


def perf_point(cfg: BenchConfig, served: Served, batch: int, load: Load, work: Path) -> Point:
    """One perf_analyzer run at ``load``; its CSV gives the split (for an ensemble: the statistics, summed)."""
    from hrnet_triton.tools import find_tools

    tools = find_tools()
    headers = (f"{ADMIN_HEADER}:{cfg.admin_key}",) if cfg.admin_key else ()
    target = PerfTarget(cfg.perf_url, cfg.protocol, served.model, batch, served.input_data, headers)
    models = [served.model, *served.steps]
    before = snapshot(cfg.url, models, cfg.admin_key)
    with ResourceMonitor(cfg.url, cfg.metrics) as monitor:
        measured = run_perf(tools.perf_analyzer, tools.env, target, load, cfg.perf, work)
    split = split_between(before, snapshot(cfg.url, models, cfg.admin_key), served.model, served.steps)
    row = measured.row
    if not served.steps:  # perf_analyzer's own split covers exactly its measured windows
        us = (row.queue_us, row.compute_input_us, row.compute_infer_us, row.compute_output_us)
        split = ServerSplit(*(v / 1000 for v in us), split.avg_batch)
    note = "; ".join(n for n in (measured.note, monitor.result.note) if n)
    return Point(
        tool="perf_analyzer", requests=measured.requests, failures=0,
        requests_per_s=round(row.inferences_per_s / batch, 3), images_per_s=round(row.inferences_per_s, 3),
        p50_ms=row.p50_us / 1000, p90_ms=row.p90_us / 1000, p95_ms=row.p95_us / 1000, p99_ms=row.p99_us / 1000,
        latency_step_ms=0.001, stable=measured.stable, note=note,
        **_measured(cfg, served, batch, load, monitor.result, split),
    )  # fmt: skip


def failed_point(cfg: BenchConfig, tool: str, served: Served, batch: int, load: Load, err: Exception) -> Point:
    """The row of a point a tool could not measure: every figure None, the reason in ``note``."""
    none = Resources(None, None, None, None, "")
    split = ServerSplit(0, 0, 0, 0, None)
    fields = _measured(cfg, served, batch, load, none, split)
    fields.update({k: None for k in fields if k.startswith("server_")})
    nothing = dict.fromkeys(["requests", "failures", "requests_per_s", "images_per_s", "latency_step_ms"])
    percentiles = dict.fromkeys(["p50_ms", "p90_ms", "p95_ms", "p99_ms"])
    return Point(tool=tool, stable=None, note=f"not measured: {err}", **nothing, **percentiles, **fields)


def _measure(cfg: BenchConfig, tool: str, served: Served, batch: int, load: Load, work: Path) -> Point:
    try:
        if tool == "locust":
            point = locust_point(cfg, served, batch, load.concurrency or 1, work)
        else:
            point = perf_point(cfg, served, batch, load, work)
    except HrnetTritonError as err:
        log.warning("%s at %s, batch %d, %s: %s", tool, served.model, batch, load.describe(), err)
        return failed_point(cfg, tool, served, batch, load, err)
    log.info(
        "%s, %s, batch %d, %s: %.1f images/s, p50 %.1f ms, p99 %.1f ms, avg batch %s, queue %.1f ms, compute %.1f ms",
        *(tool, point.model, batch, load.describe(), point.images_per_s, point.p50_ms, point.p99_ms),
        *(point.avg_batch, point.server_queue_ms, point.server_compute_ms),
    )
    return point


def rates_for(cfg: BenchConfig, closed: list[Point]) -> list[float]:
    """The request rates of the open-loop sweep: given, or fractions of the closed loop's peak requests/s."""
    if cfg.request_rates != "auto":
        return list(cfg.request_rates)
    peaks = [p.requests_per_s for p in closed if p.tool == "perf_analyzer" and p.requests_per_s]
    peaks = peaks or [p.requests_per_s for p in closed if p.requests_per_s]
    return [float(f"{max(peaks) * f:.3g}") for f in RATE_FRACTIONS] if peaks else []


def served_inputs(cfg: BenchConfig, work: Path) -> list[Served]:
    """Each input to sweep, with its served model, its steps and (for perf_analyzer) its data file."""
    from hrnet_client.served_model import Protocol, address, choose, new_client
    from hrnet_core.samples import sample_images

    addr = address(cfg.url, Protocol.HTTP)
    client = new_client(addr, Protocol.HTTP)
    try:
        chosen = [choose(client, addr, Protocol.HTTP, cfg.model, kind, retries=0) for kind in (cfg.inputs or [None])]
    finally:
        client.close()
    served = []
    for m in chosen:
        data = None
        if "perf_analyzer" in cfg.tools:
            arrays = [m.input.load(path, m.cfg) for path in sample_images()]
            data = write_input_data(work / f"data-{m.name}.json", m.input.name, arrays, m.input.kind)
        served.append(Served(m.input.kind, m.name, ensemble_steps(cfg.url, m.name), data))
    return served


def check(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with its url normalised, the admin key defaulted, and the server, model, key and tools checked."""
    url = cfg.url.rstrip("/") if "//" in cfg.url else f"http://{cfg.url}".rstrip("/")
    cfg = replace(cfg, url=url, admin_key=cfg.admin_key or os.environ.get(ADMIN_KEY_ENV))
    unknown = set(cfg.tools) - set(TOOLS)
    if unknown or not cfg.tools:
        raise HrnetTritonError(f"--tools takes {','.join(TOOLS)} (one or both); got {','.join(cfg.tools) or 'none'}")
    if "locust" in cfg.tools and not locustfile().is_file():
        raise HrnetTritonError(f"{locustfile()} is missing; reinstall hrnet-triton with the loadtest extra")
    model_stats(cfg.url, cfg.model, cfg.admin_key)  # fail early: no server, no such model, or no key
    if "perf_analyzer" in cfg.tools:
        from hrnet_triton.tools import find_tools

        find_tools()  # ToolsMissing says what to do
        if cfg.protocol == "grpc" and cfg.admin_key:
            raise HrnetTritonError(
                "perf_analyzer 2.41.1 sends -H headers over HTTP only, so over gRPC it cannot read the statistics "
                "of a server whose admin APIs need a key; use --protocol http, or --tools locust for gRPC"
            )
    return cfg


def sweep(cfg: BenchConfig) -> list[Point]:
    """Every input × batch size: the concurrency sweep with each tool (interleaved), then perf_analyzer's rates."""
    cfg = check(cfg)
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="hrnet-bench-") as tmp:
        work = Path(tmp)
        for served in served_inputs(cfg, work):
            for batch in cfg.batch_sizes:
                closed = [
                    _measure(cfg, tool, served, batch, Load(concurrency=c), work)
                    for c in cfg.concurrencies
                    for tool in cfg.tools
                ]
                points += closed
                if "perf_analyzer" in cfg.tools:
                    rates = rates_for(cfg, closed)
                    points += [_measure(cfg, "perf_analyzer", served, batch, Load(rate=r), work) for r in rates]
    return points
