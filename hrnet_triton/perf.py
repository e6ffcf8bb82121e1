"""perf_analyzer, NVIDIA's load generator for Triton, run for one point of ``hrnet-triton bench``.

One point is one ``perf_analyzer`` run at one load: a concurrency (closed loop, ``--concurrency-range
N``) or a request rate (open loop, ``--request-rate-range R``). perf_analyzer measures windows
(``--measurement-interval`` or ``--measurement-request-count``) until the last three agree within
``--stability-percentage``, or gives up after ``--max-trials``. Its CSV (``-f``, ``--verbose-csv``)
holds throughput, p50/p90/p95/p99 in microseconds and the server's queue / compute input / infer /
output split, which perf_analyzer reads from Triton's statistics API. When a point does not
stabilise perf_analyzer writes no CSV; :func:`run_perf` then measures it once more with three
windows accepted as they are, and says so (``stable=False`` and the windows' spread).

The requests carry real data: the sample photographs in the served model's input form
(:func:`write_input_data`), not random bytes (which are NaN as float32, and not images).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hrnet_core import atomic
from hrnet_core.errors import HrnetTritonError

UNSTABLE = "Failed to obtain stable measurement"
# Accepts any three windows: the follow-up measurement of a point that did not stabilise.
NO_STABILITY_CHECK = ("--stability-percentage", "100000", "--max-trials", "3")


@dataclass(frozen=True)
class PerfSettings:
    """How perf_analyzer measures each point."""

    window_seconds: float = 5.0  # time_windows: the length of one window
    window_requests: int | None = None  # count_windows: at least this many requests per window, instead
    stability_percentage: float = 10.0
    max_trials: int = 6
    request_distribution: str = "constant"  # open loop: constant or poisson intervals


@dataclass(frozen=True)
class Load:
    """One point's load: ``concurrency`` requests in flight, or ``rate`` requests per second."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def mode(self) -> str:
        return "concurrency" if self.concurrency is not None else "rate"

    def options(self) -> list[str]:
        if self.concurrency is not None:
            return ["--concurrency-range", str(self.concurrency)]
        return ["--request-rate-range", f"{self.rate:g}"]

    def describe(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"{self.rate:g} requests/s"


@dataclass(frozen=True)
class PerfRow:
    """One line of perf_analyzer's verbose CSV; times in microseconds."""

    load: float  # the concurrency or the request rate
    inferences_per_s: float  # images/s: perf_analyzer counts each image of a batch
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    client_send_us: float
    network_us: float  # network + the server's send/receive
    client_recv_us: float


_CSV_COLUMNS = {
    "inferences_per_s": "Inferences/Second",
    "p50_us": "p50 latency",
    "p90_us": "p90 latency",
    "p95_us": "p95 latency",
    "p99_us": "p99 latency",
    "avg_us": "Avg latency",
    "queue_us": "Server Queue",
    "compute_input_us": "Server Compute Input",
    "compute_infer_us": "Server Compute Infer",
    "compute_output_us": "Server Compute Output",
    "client_send_us": "Client Send",
    "network_us": "Network+Server Send/Recv",
    "client_recv_us": "Client Recv",
}


def parse_csv(text: str) -> list[PerfRow]:
    """The rows of a perf_analyzer ``-f`` CSV written with ``--verbose-csv`` (one per load level).

    Raises :class:`HrnetTritonError` naming the missing columns if the file is not such a CSV."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    load_column = next((c for c in ("Concurrency", "Request Rate") if c in header), None)
    missing = [c for c in _CSV_COLUMNS.values() if c not in header]
    if load_column is None or missing:
        raise HrnetTritonError(
            f"not a perf_analyzer --verbose-csv report: missing column(s) {missing or ['Concurrency/Request Rate']} "
            f"in header {header}; run perf_analyzer with -f FILE --verbose-csv"
        )
    rows = []
    for line in reader:
        values = {field: float(line[column]) for field, column in _CSV_COLUMNS.items()}
        rows.append(PerfRow(load=float(line[load_column]), **values))
    return rows


_PASS = re.compile(r"Pass \[\d+\] throughput: ([\d.]+) infer/sec\. Avg latency: (\d+) usec")
_REQUESTS = re.compile(r"Client:\s*\n\s*Request count: (\d+)")


def window_spread(stdout: str) -> float | None:
    """The spread (max/min - 1, in %) of the last three windows' throughput and average latency,
    the figure perf_analyzer's stability check compares with ``--stability-percentage``."""
    passes = [(float(t), float(lat)) for t, lat in _PASS.findall(stdout)][-3:]
    if len(passes) < 2 or min(min(p) for p in passes) <= 0:
        return None
    spreads = [max(col) / min(col) - 1 for col in zip(*passes)]
    return round(100 * max(spreads), 1)


def request_count(stdout: str) -> int | None:
    """The requests perf_analyzer counted in its measured windows (its verbose report's "Request count")."""
    found = _REQUESTS.findall(stdout)
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class PerfTarget:
    """What perf_analyzer sends to: the server, the model, the protocol and the prepared input data."""

    url: str  # host:port of the protocol's port
    protocol: str  # http or grpc
    model: str
    batch_size: int
    input_data: Path  # a perf_analyzer JSON data file (:func:`write_input_data`)
    headers: tuple[str, ...] = ()  # "Header:Value" for HTTP (the admin key, for the statistics API)


def perf_command(
    binary: Path, target: PerfTarget, load: Load, settings: PerfSettings, csv_path: Path, stable: bool = True
) -> list[str]:
    """The perf_analyzer command line of one point."""
    cmd = [str(binary), "-v", "--service-kind=triton", "-m", target.model, "-u", target.url, "-i", target.protocol]
    cmd += ["-b", str(target.batch_size), "--input-data", str(target.input_data), *load.options()]
    if settings.window_requests:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(settings.window_requests)]
    else:
        cmd += ["--measurement-mode", "time_windows", "-p", str(round(settings.window_seconds * 1000))]
    if load.rate is not None:
        cmd += ["--request-distribution", settings.request_distribution]
    if stable:
        cmd += [
            "--stability-percentage",
            f"{settings.stability_percentage:g}",
            "--max-trials",
            str(settings.max_trials),
        ]
    else:
        cmd += list(NO_STABILITY_CHECK)
    for header in target.headers if target.protocol == "http" else ():
        cmd += ["-H", header]
    return [*cmd, "-f", str(csv_path), "--verbose-csv"]


@dataclass(frozen=True)
class PerfPoint:
    row: PerfRow
    requests: int | None
    stable: bool
    note: str  # empty, or why the figures need a caveat


def run_perf(
    binary: Path, env: dict[str, str], target: PerfTarget, load: Load, settings: PerfSettings, work: Path
) -> PerfPoint:
    """Measure one point; a point that does not stabilise is measured again without the check (``stable=False``)."""
    csv_path = work / f"pa-{target.model}-b{target.batch_size}-{load.mode}{load.concurrency or load.rate:g}.csv"
    first = _run(perf_command(binary, target, load, settings, csv_path), env, load)
    if UNSTABLE not in first:
        return PerfPoint(_one_row(csv_path), request_count(first), True, "")
    spread = window_spread(first)
    second = _run(perf_command(binary, target, load, settings, csv_path, stable=False), env, load)
    if UNSTABLE in second:
        raise HrnetTritonError(f"perf_analyzer could not measure {load.describe()} even without its stability check")
    note = (
        f"did not stabilise within {settings.max_trials} windows at ±{settings.stability_percentage:g}% "
        f"(last windows spread {spread}%); figures from 3 more windows, unchecked"
    )
    return PerfPoint(_one_row(csv_path), request_count(second), False, note)


def _run(cmd: list[str], env: dict[str, str], load: Load) -> str:
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as err:
        raise HrnetTritonError(f"perf_analyzer ran over 30 minutes at {load.describe()}; shorten the windows") from err
    out = done.stdout + done.stderr
    if done.returncode != 0 and UNSTABLE not in out:
        errors = [line.strip() for line in out.splitlines() if "error" in line.lower()] or out.splitlines()[-3:]
        raise HrnetTritonError(
            f"perf_analyzer failed at {load.describe()} (exit {done.returncode}): {' | '.join(errors[-3:])[:1500]}"
        )
    return out


def _one_row(csv_path: Path) -> PerfRow:
    rows = parse_csv(csv_path.read_text())
    if len(rows) != 1:
        raise HrnetTritonError(f"{csv_path}: expected one measured load, found {len(rows)}")
    return rows[0]


def write_input_data(path: Path, input_name: str, arrays: list, kind: str) -> Path:
    """A perf_analyzer ``--input-data`` JSON file: one stream entry per array (one image each), base64-encoded.

    ``kind`` "image" arrays hold one encoded file (BYTES): they are written serialized as Triton's
    length-prefixed BYTES tensor, which is what perf_analyzer sends for base64 data."""
    import numpy as np

    entries = []
    for array in arrays:
        if kind == "image":
            raw = _serialized_bytes(bytes(np.asarray(array).reshape(-1)[0]))
            shape = [1]
        else:
            raw, shape = np.ascontiguousarray(array).tobytes(), list(np.shape(array))
        entries.append({input_name: {"b64": base64.b64encode(raw).decode("ascii"), "shape": shape}})
    atomic.write_text(path, json.dumps({"data": entries}))
    return path


def _serialized_bytes(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data
