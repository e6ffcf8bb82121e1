"""``hrnet-triton bench``: sweep input, batch size and concurrency with Locust against a running server.

Each point is one headless run of ``loadtest/hrnet.py`` (``-u`` = concurrency, closed loop),
sending one input kind (``--input``: tensor, uint8 or image; :mod:`hrnet_client.inputs`).
Around it the model's statistics are read from Triton's statistics API, and the difference
splits the server's time per request into time queued and time computing (input, inference
and output); for the image input's ensemble, summed over its steps (decoding, then the model).
The results are written as ``bench.csv``, ``bench.md`` (a table) and ``bench.png`` (images/s
against p50/p95/p99 latency, one line per input and batch size).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hrnet_core import atomic
from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV
from hrnet_core.errors import HrnetTritonError

log = logging.getLogger(__name__)


def locustfile() -> Path:
    """The Locust file, from the installed ``hrnet_loadtest`` package (a checkout's ``loadtest/``)."""
    from importlib import resources

    return Path(str(resources.files("hrnet_loadtest").joinpath("hrnet.py")))


@dataclass(frozen=True)
class Point:
    input: str  # tensor, uint8 or image
    model: str  # the served model that input went to
    batch_size: int
    concurrency: int
    requests: int
    failures: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_queue_ms: float  # mean per request, from Triton's statistics
    server_compute_ms: float


def model_stats(url: str, model: str, admin_key: str | None = None) -> dict:
    """The model's statistics from Triton's statistics API, with the admin key if the server restricts it."""
    headers = {ADMIN_HEADER: admin_key} if admin_key else {}
    request = urllib.request.Request(f"{url}/v2/models/{model}/stats", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)["model_stats"][0]
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            given = "the admin key given was refused" if admin_key else "no admin key was given"
            raise HrnetTritonError(
                f"the server at {url} restricts its statistics API and {given} ({err.code}); pass the server's key "
                f"with --admin-key or ${ADMIN_KEY_ENV} (`hrnet-triton serve` prints it when it makes one)"
            ) from err
        raise HrnetTritonError(
            f"the server at {url} has no statistics for model {model!r} ({err.code}); check --model"
        ) from err
    except OSError as err:
        raise HrnetTritonError(
            f"no Triton server answers at {url} ({err}); start one with `hrnet-triton serve`"
        ) from err


def server_split(before: dict, after: dict) -> tuple[float, float]:
    """Mean queue and compute milliseconds per request between two statistics snapshots."""

    def ns(stats: dict, key: str) -> int:
        return int(stats["inference_stats"][key]["ns"])

    requests = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    if requests <= 0:
        return 0.0, 0.0
    queue = ns(after, "queue") - ns(before, "queue")
    compute = sum(ns(after, k) - ns(before, k) for k in ("compute_input", "compute_infer", "compute_output"))
    return queue / requests / 1e6, compute / requests / 1e6


def ensemble_steps(url: str, model: str) -> list[str]:
    """The models an ensemble's steps call, in order (``[]`` for a model that is not an ensemble)."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{model}/config", timeout=10) as r:
            config = json.load(r)
    except (OSError, ValueError) as err:
        raise HrnetTritonError(f"cannot read {model}'s config from {url} ({err}); check --url and --model") from err
    return [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])]


def ensemble_split(
    before: dict[str, dict], after: dict[str, dict], model: str, steps: list[str]
) -> tuple[float, float]:
    """Mean queue and compute ms per request of the ensemble ``model``: the sums over its ``steps``
    (an ensemble's own statistics count its requests, not where their time went)."""

    def count(stats: dict) -> int:
        return int(stats["inference_stats"]["success"]["count"])

    requests = count(after[model]) - count(before[model])
    if requests <= 0:
        return 0.0, 0.0
    queue = compute = 0.0
    for step in steps:
        step_queue, step_compute = server_split(before[step], after[step])  # per request of the step
        share = (count(after[step]) - count(before[step])) / requests
        queue, compute = queue + step_queue * share, compute + step_compute * share
    return queue, compute


def _locust_command(
    url: str, model: str, kind: str, protocol: str, grpc_port: int, batch: int, users: int, seconds: float
) -> list[str]:
    options = {
        "--host": url, "--model": model, "--input": kind, "--protocol": protocol, "--grpc-port": grpc_port,
        "--batch-size": batch, "-u": users, "-r": users, "-t": f"{seconds:g}s", "--max-failure-ratio": 1,
    }  # fmt: skip
    flags = [str(x) for option, value in options.items() for x in (option, value)]
    return [sys.executable, "-m", "locust", "-f", str(locustfile()), "--headless", "--only-summary", *flags]


def run_point(
    url: str,
    served: tuple[str, str],
    protocol: str,
    grpc_port: int,
    batch: int,
    concurrency: int,
    seconds: float,
    work: Path,
    admin_key: str | None = None,
) -> Point:
    """One Locust run sending ``served`` = (input kind, served model) at ``batch`` and ``concurrency``."""
    kind, model = served
    prefix = work / f"{kind}-b{batch}-c{concurrency}"
    steps = ensemble_steps(url, model)
    before = {m: model_stats(url, m, admin_key) for m in (model, *steps)}
    locust = _locust_command(url, model, kind, protocol, grpc_port, batch, concurrency, seconds)
    run = subprocess.run([*locust, "--csv", str(prefix)], capture_output=True, text=True, cwd=work)
    after = {m: model_stats(url, m, admin_key) for m in (model, *steps)}
    if run.returncode != 0:
        tail = "\n".join(line for line in run.stderr.splitlines() if "ERROR" in line)[-2000:]
        raise HrnetTritonError(
            f"Locust failed at input {kind}, batch {batch}, concurrency {concurrency} (exit {run.returncode}): {tail}"
        )
    with open(f"{prefix}_stats.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    ok_per_s = float(row["Requests/s"]) - float(row["Failures/s"])
    split = ensemble_split(before, after, model, steps) if steps else server_split(before[model], after[model])
    queue_ms, compute_ms = split
    latencies = (float(row["50%"]), float(row["95%"]), float(row["99%"]))
    count, failures, rate = int(row["Request Count"]), int(row["Failure Count"]), float(row["Requests/s"])
    return Point(
        kind, model, batch, concurrency, count, failures, rate, ok_per_s * batch, *latencies, queue_ms, compute_ms
    )


def write_results(points: list[Point], out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Point)]
    with atomic.atomic_path(out / "bench.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=names)
            writer.writeheader()
            writer.writerows(asdict(p) for p in points)
    lines = [
        f"{title}\n",
        "| input | batch | concurrency | images/s | requests/s | p50 ms | p95 ms | p99 ms | failures | "
        "server queue ms | server compute ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.input} | {p.batch_size} | {p.concurrency} | {p.images_per_s:.1f} | {p.requests_per_s:.2f} | "
            f"{p.p50_ms:.0f} | {p.p95_ms:.0f} | {p.p99_ms:.0f} | {p.failures}/{p.requests} | {p.server_queue_ms:.0f} | "
            f"{p.server_compute_ms:.0f} |"
        )
    atomic.write_text(out / "bench.md", "\n".join(lines) + "\n")
    _plot(points, out / "bench.png", title)
    return [out / "bench.csv", out / "bench.md", out / "bench.png"]


def _plot(points: list[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, batch in sorted({(p.input, p.batch_size) for p in points}):
        row = sorted((p for p in points if (p.input, p.batch_size) == (kind, batch)), key=lambda p: p.concurrency)
        x = [p.images_per_s for p in row]
        for attr, style in (("p50_ms", "-o"), ("p95_ms", "--s"), ("p99_ms", ":^")):
            ax.plot(x, [getattr(p, attr) for p in row], style, label=f"{kind}, batch {batch}, {attr[:3]}")
        for p in row:
            ax.annotate(
                f"c={p.concurrency}",
                (p.images_per_s, p.p50_ms),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency per request (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def served_inputs(url: str, model: str, inputs: list[str] | None) -> list[tuple[str, str]]:
    """(input kind, served model) for each of ``inputs`` (None: the best the server offers for ``model``)."""
    from hrnet_client.served_model import Protocol, address, choose, new_client

    addr = address(url, Protocol.HTTP)
    client = new_client(addr, Protocol.HTTP)
    try:
        chosen = [choose(client, addr, Protocol.HTTP, model, kind, retries=0) for kind in (inputs or [None])]
    finally:
        client.close()
    return [(m.input.kind, m.name) for m in chosen]


def sweep(
    url: str,
    model: str,
    *,
    protocol: str = "http",
    grpc_port: int = 8001,
    batch_sizes: list[int],
    concurrencies: list[int],
    inputs: list[str] | None = None,
    seconds: float,
    out: Path,
    admin_key: str | None = None,
) -> list[Point]:
    """One point per input, batch size and concurrency; ``admin_key`` (default: ``$HRNET_TRITON_ADMIN_KEY``)
    reads stats. ``inputs`` None: the input the server offers best for ``model``."""
    if not locustfile().is_file():
        raise HrnetTritonError(f"{locustfile()} is missing; reinstall hrnet-triton with the loadtest extra")
    url = url.rstrip("/") if "//" in url else f"http://{url}".rstrip("/")
    admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV)
    model_stats(url, model, admin_key)  # fail early: no server, no such model, or no key
    served = served_inputs(url, model, inputs)
    points = []
    with tempfile.TemporaryDirectory(prefix="hrnet-bench-") as tmp:
        for kind_model in served:
            for batch in batch_sizes:
                for concurrency in concurrencies:
                    p = run_point(
                        url, kind_model, protocol, grpc_port, batch, concurrency, seconds, Path(tmp), admin_key
                    )
                    points.append(p)
                    log.info(
                        "%s, batch %d, concurrency %d: %.1f images/s, p50 %.0f ms, p95 %.0f ms, queue %.0f ms, "
                        "compute %.0f ms",
                        *(p.model, batch, concurrency, p.images_per_s, p.p50_ms, p.p95_ms),
                        *(p.server_queue_ms, p.server_compute_ms),
                    )
    return points


def title_for(url: str, model: str, protocol: str, seconds: float) -> str:
    from datetime import date
    from platform import python_version

    return (
        f"{model} over {protocol.upper()} at {url}; Locust, {seconds:g} s per point; "
        f"{date.today()}, Python {python_version()}"
    )
