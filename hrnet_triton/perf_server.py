"""What ``hrnet-triton bench`` reads from the server around each point, whatever drives the load.

- :func:`model_stats`: Triton's statistics extension (``/v2/models/<m>/stats``, an admin API).
  Two snapshots give the server's split of a request's time (:func:`split_between`: queue,
  compute input, compute infer, compute output) and the average batch it formed
  (``inference_count / execution_count``), for an ensemble summed over its steps.
- :class:`ResourceMonitor`: the CPU time of the server's processes (tritonserver and its
  python-backend stubs, found by the port they listen on; only for a server on this machine), that
  of the load generator (a child process: its ``RUSAGE_CHILDREN``), and
  the GPU figures of the metrics port (``nv_gpu_utilization``, ``nv_gpu_memory_used_bytes``),
  polled once a second. A CPU server publishes no GPU figures, and a remote one shows no
  process here: the monitor then says so instead of reporting zeros.
- :func:`describe_server`: Triton's version and the runtime serving the model, for titles.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV
from hrnet_core.errors import HrnetTritonError

STEPS = ("queue", "compute_input", "compute_infer", "compute_output")


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


def _get_json(url: str, what: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except (OSError, ValueError) as err:
        raise HrnetTritonError(f"cannot read {what} from {url} ({err}); check --url and --model") from err


def model_config(url: str, model: str) -> dict:
    return _get_json(f"{url}/v2/models/{model}/config", f"{model}'s config")


def ensemble_steps(url: str, model: str) -> list[str]:
    """The models an ensemble's steps call, in order (``[]`` for a model that is not an ensemble)."""
    return [step["model_name"] for step in model_config(url, model).get("ensemble_scheduling", {}).get("step", [])]


@dataclass(frozen=True)
class ServerSplit:
    """Mean milliseconds per request the server spent in each step, and the average batch it ran."""

    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    avg_batch: float | None  # inference_count / execution_count; None if nothing was executed

    @property
    def compute_ms(self) -> float:
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


def _count(stats: dict) -> int:
    return int(stats["inference_stats"]["success"]["count"])


def _step_ms(before: dict, after: dict) -> list[float]:
    """Per request of this model: mean ms of each of :data:`STEPS`."""
    requests = _count(after) - _count(before)
    if requests <= 0:
        return [0.0] * len(STEPS)
    ns = [int(after["inference_stats"][s]["ns"]) - int(before["inference_stats"][s]["ns"]) for s in STEPS]
    return [n / requests / 1e6 for n in ns]


def _avg_batch(before: dict, after: dict) -> float | None:
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    inferences = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    return round(inferences / executions, 3) if executions > 0 else None


def split_between(before: dict[str, dict], after: dict[str, dict], model: str, steps: list[str]) -> ServerSplit:
    """The split of ``model``'s requests between two snapshots (``{model: stats}``, with every ensemble step).

    For an ensemble its steps' times are summed, each weighted by its requests per ensemble request
    (an ensemble's own statistics count requests, not where their time went), and the average batch
    is that of its last step, the network."""
    if not steps:
        return ServerSplit(*_step_ms(before[model], after[model]), _avg_batch(before[model], after[model]))
    requests = _count(after[model]) - _count(before[model])
    totals = [0.0] * len(STEPS)
    for step in steps if requests > 0 else ():
        share = (_count(after[step]) - _count(before[step])) / requests
        totals = [t + ms * share for t, ms in zip(totals, _step_ms(before[step], after[step]))]
    return ServerSplit(*totals, _avg_batch(before[steps[-1]], after[steps[-1]]))


def server_split(before: dict, after: dict) -> tuple[float, float]:
    """Mean queue and compute milliseconds per request between two statistics snapshots of one model."""
    split = split_between({"m": before}, {"m": after}, "m", [])
    return split.queue_ms, split.compute_ms


def snapshot(url: str, models: list[str], admin_key: str | None) -> dict[str, dict]:
    return {m: model_stats(url, m, admin_key) for m in models}


# -- what serves the model ------------------------------------------------------------------------


RUNTIME_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def runtime_of(config: dict) -> str:
    """The runtime behind a model config: its ``runtime`` parameter if it has one, else what its backend says."""
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    if params.get("runtime"):
        name = RUNTIME_NAMES.get(params["runtime"], params["runtime"])
        precision = f" {params['precision']}" if params.get("precision") else ""
        where = " (python backend)" if config.get("backend") == "python" else ""
        return f"{name}{precision}{where}"
    if any(k.startswith("openvino") for k in params):
        return "OpenVINO (python backend)"
    if config.get("platform") == "ensemble":
        return "ensemble"
    backend = config.get("backend") or config.get("platform", "")
    if backend == "python":
        return "ONNX Runtime (python backend)" if any(k.startswith("onnx") for k in params) else "python backend"
    return {"onnxruntime": "ONNX Runtime backend", "tensorrt_plan": "TensorRT", "tensorrt": "TensorRT"}.get(
        backend, backend or "unknown"
    )


def describe_server(url: str, model: str) -> dict[str, str]:
    """Triton's version, and the target and runtime serving ``model`` (for an ensemble: its last step's)."""
    meta = _get_json(f"{url}/v2", "the server's metadata")
    config = model_config(url, model)
    steps = [s["model_name"] for s in config.get("ensemble_scheduling", {}).get("step", [])]
    served = model_config(url, steps[-1]) if steps else config
    return {
        "triton_version": meta.get("version", "unknown"),
        "target": target_of(served),
        "runtime": runtime_of(served),
    }


def target_of(config: dict) -> str:
    """This project's serving target a model config belongs to (``hrnet-triton repo --target``)."""
    backend = config.get("backend") or config.get("platform", "")
    if backend == "python":
        return "cpu"
    return "gpu" if backend.startswith("tensorrt") else "onnx" if backend in ("onnxruntime", "openvino") else backend


# -- resources ------------------------------------------------------------------------------------

_GPU_METRIC = re.compile(r"^(nv_gpu_utilization|nv_gpu_memory_used_bytes)\{[^}]*\}\s+([0-9.eE+-]+)", re.M)


def gpu_sample(metrics_url: str) -> dict[str, float] | None:
    """Summed over GPUs: utilisation (0..1 each) and memory used (bytes); None when the port publishes neither."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    found: dict[str, float] = {}
    for name, value in _GPU_METRIC.findall(text):
        found[name] = found.get(name, 0.0) + float(value)
    return found or None


def server_pids(url: str) -> list[int]:
    """The local processes behind ``url``: the one listening on its port, and its children."""
    import psutil

    port = urlsplit(url).port or 8000
    try:
        listeners = [c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    except psutil.AccessDenied:
        return []
    pids: list[int] = []
    for pid in {p for p in listeners if p}:
        try:
            pids += [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            continue
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children: the load generator runs as one."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Resources:
    server_cpu_percent: float | None  # 100 = one core
    client_cpu_percent: float | None  # the load generator's (perf_analyzer or Locust, a child process)
    gpu_utilization_percent: float | None
    gpu_memory_used_mb: float | None
    note: str  # why a figure is missing


class ResourceMonitor:
    """``with ResourceMonitor(url, metrics_url) as mon: ...``, then ``mon.result``: what the server used meanwhile."""

    def __init__(self, url: str, metrics_url: str, interval_s: float = 1.0):
        self.url, self.metrics_url, self.interval_s = url, metrics_url, interval_s
        self._samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self.result = Resources(None, None, None, None, "not measured")

    def __enter__(self) -> ResourceMonitor:
        self._pids = server_pids(self.url)
        self._cpu0, self._t0 = _cpu_seconds(self._pids), time.monotonic()
        self._client0 = _children_cpu_seconds()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            sample = gpu_sample(self.metrics_url)
            if sample:
                self._samples.append(sample)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        seconds = time.monotonic() - self._t0
        cpu = round(100 * (_cpu_seconds(self._pids) - self._cpu0) / seconds, 1) if self._pids and seconds else None
        util = [s["nv_gpu_utilization"] for s in self._samples if "nv_gpu_utilization" in s]
        mem = [s["nv_gpu_memory_used_bytes"] for s in self._samples if "nv_gpu_memory_used_bytes" in s]
        notes = [] if self._pids else ["server CPU not measured: no process on this machine listens on its port"]
        if not util and not mem:
            notes.append(f"no GPU metrics at {self.metrics_url} (a CPU server publishes none)")
        client = round(100 * (_children_cpu_seconds() - self._client0) / seconds, 1) if seconds else None
        self.result = Resources(
            cpu,
            client,
            round(100 * sum(util) / len(util), 1) if util else None,
            round(max(mem) / 2**20, 1) if mem else None,
            "; ".join(notes),
        )
