"""What ``hrnet-triton tune`` asks Model Analyzer: the search space per target and the ``profile`` config.

:class:`SearchSpace` holds the model-config fields Model Analyzer sweeps (instance count, max
batch, dynamic batching's queue delay) and the load it measures each one under (client
concurrency, request batch). :func:`analyzer_config` turns it into Model Analyzer 1.58's
``profile`` config: a manual brute-force search (``model_config_parameters``), the objective
``perf_throughput`` under the constraint ``perf_latency_p95 <= SLO``, local launch mode with one
server per model config (docs/tune.md says why). It is written as JSON, which is YAML: Model
Analyzer reads it with ``yaml.safe_load``.

Nothing here runs anything; :mod:`hrnet_triton.tune` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hrnet_build.config import InstanceKind, RepositoryOptions, Target
from hrnet_core.errors import HrnetTritonError

# How long perf_analyzer measures each point: windows of N requests, stable within P % over 3
# windows, at most T windows. A batch-1 HRNet_W18_C request takes ~0.1-0.3 s on the 2-core CPU.
DEFAULT_WINDOW_REQUESTS = 20
DEFAULT_STABILITY_PERCENT = 25
DEFAULT_MAX_TRIALS = 6
# perf_analyzer's timeout for one measurement, in s (Model Analyzer's default is 600).
PERF_ANALYZER_TIMEOUT_S = 300


@dataclass(frozen=True)
class SearchSpace:
    """The grid Model Analyzer measures: every combination of the three model fields, at each concurrency."""

    instances: tuple[int, ...]
    max_batch_sizes: tuple[int, ...]
    queue_delays_us: tuple[int, ...]
    concurrency: tuple[int, ...]
    request_batch: int = 1  # images per request (perf_analyzer -b)

    def __post_init__(self) -> None:
        for name in ("instances", "max_batch_sizes", "concurrency"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise HrnetTritonError(f"the search's {name} must be one or more positive integers, got {values}")
        if not self.queue_delays_us or min(self.queue_delays_us) < 0:
            raise HrnetTritonError(f"queue delays must be 0 or more microseconds, got {self.queue_delays_us}")
        if self.request_batch < 1 or self.request_batch > min(self.max_batch_sizes):
            raise HrnetTritonError(
                f"a request of {self.request_batch} images needs every searched max batch to be at least that; "
                f"got max batches {self.max_batch_sizes}: raise them or lower --request-batch"
            )

    @property
    def model_configs(self) -> int:
        return len(self.instances) * len(self.max_batch_sizes) * len(self.queue_delays_us)

    @property
    def measurements(self) -> int:
        return self.model_configs * len(self.concurrency)

    @classmethod
    def for_target(cls, target: Target) -> SearchSpace:
        """The target's default grid (docs/tune.md explains each)."""
        return _SPACES[Target(target)]


_SPACES: dict[Target, SearchSpace] = {
    # 2 cores: 1 or 2 instances; no batching against batching up to 8; no delay against 2 ms.
    Target.CPU: SearchSpace((1, 2), (1, 8), (0, 2000), (2, 4)),
    Target.ONNX: SearchSpace((1, 2), (4, 16), (0, 2000), (2, 8)),
    # A GPU: instances 1-3, max batch 8-32 (the plans' profile caps it), delay 0-2 ms, enough
    # concurrency to fill batches of 32.
    Target.GPU: SearchSpace((1, 2, 3), (8, 16, 32), (0, 500, 1000, 2000), (8, 32, 64, 128)),
}


@dataclass(frozen=True)
class Measuring:
    """How perf_analyzer measures each point (its count_windows mode)."""

    window_requests: int = DEFAULT_WINDOW_REQUESTS
    stability_percent: int = DEFAULT_STABILITY_PERCENT
    max_trials: int = DEFAULT_MAX_TRIALS

    def __post_init__(self) -> None:
        for option, value in (
            ("--window-requests", self.window_requests),
            ("--stability-percent", self.stability_percent),
            ("--max-trials", self.max_trials),
        ):
            if value < 1:
                raise HrnetTritonError(f"{option} must be a whole number of 1 or more, got {value}")

    def flags(self) -> dict[str, object]:
        return {
            "measurement-mode": "count_windows",
            "measurement-request-count": self.window_requests,
            "stability-percentage": self.stability_percent,
            "max-trials": self.max_trials,
            # perf_analyzer's default random bytes read as float32 hold NaN/Inf, which the model refuses
            "input-data": "zero",
        }


@dataclass(frozen=True)
class Endpoints:
    """The ports Model Analyzer's servers listen on (127.0.0.1)."""

    http: int
    grpc: int
    metrics: int

    def __post_init__(self) -> None:
        ports = (self.http, self.grpc, self.metrics)
        if len(set(ports)) != 3 or not all(1 <= port <= 65535 for port in ports):
            raise HrnetTritonError(f"--ports takes three different ports in 1..65535, HTTP,gRPC,metrics; got {ports}")


def check_paths(out: Path, report: Path) -> None:
    """``--out`` and ``--report`` are each replaced whole: neither may be the other or lie inside it."""
    o, r = out.resolve(), report.resolve()
    if o == r or o.is_relative_to(r) or r.is_relative_to(o):
        raise HrnetTritonError(
            f"--out {out} and --report {report} {'are the same directory' if o == r else 'lie one inside the other'}; "
            "each is replaced whole when tune ends, so give two separate directories, e.g. --out w18/repo "
            "--report w18/report"
        )


@dataclass(frozen=True)
class AnalyzerRun:
    """Everything one Model Analyzer ``profile`` run needs besides the search space."""

    model: str
    target: Target
    slo_ms: float
    repository: Path  # the base repository Model Analyzer derives its variants from
    work: Path  # Model Analyzer's output repository, checkpoints and logs
    report: Path  # export_path: results CSVs, reports, plots
    launcher: Path  # triton_server_path
    perf_analyzer: Path
    endpoints: Endpoints
    server_flags: dict[str, str] = field(default_factory=dict)
    measuring: Measuring = Measuring()
    gpu_memory_mb: float | None = None  # gpu target: a constraint on the GPU memory one model may use


def base_options(target: Target, space: SearchSpace, options: RepositoryOptions | None = None) -> RepositoryOptions:
    """The options of the base config Model Analyzer derives its variants from.

    Model Analyzer changes ``max_batch_size`` and nothing that depends on it. Written at the
    smallest max batch of the search, the warm-ups (batch 1 and max), preferred batch sizes and
    CUDA-graph sizes of the base config are valid for every variant Model Analyzer makes.
    """
    return (options or RepositoryOptions.for_target(target)).with_max_batch(min(space.max_batch_sizes))


def analyzer_config(run: AnalyzerRun, space: SearchSpace) -> dict:
    """Model Analyzer 1.58's ``profile`` config for ``run`` over ``space``."""
    if not run.slo_ms > 0:
        raise HrnetTritonError(f"--slo-ms must be a positive number of milliseconds, got {run.slo_ms}")
    kind = "KIND_GPU" if run.target is Target.GPU else "KIND_CPU"
    model = {
        "cpu_only": run.target is not Target.GPU,
        "model_config_parameters": {
            "max_batch_size": list(space.max_batch_sizes),
            "instance_group": [{"kind": kind, "count": list(space.instances)}],
            "dynamic_batching": {"max_queue_delay_microseconds": list(space.queue_delays_us)},
        },
        "parameters": {"concurrency": list(space.concurrency), "batch_sizes": [space.request_batch]},
    }
    constraints: dict[str, dict[str, float]] = {"perf_latency_p95": {"max": run.slo_ms}}
    if run.gpu_memory_mb is not None:
        constraints["gpu_used_memory"] = {"max": run.gpu_memory_mb}
    e = run.endpoints
    return {
        "model_repository": str(run.repository),
        "profile_models": {run.model: model},
        "run_config_search_mode": "brute",
        "objectives": {"perf_throughput": 10},
        "constraints": constraints,
        "triton_launch_mode": "local",
        "triton_server_path": str(run.launcher),
        "triton_server_flags": run.server_flags,
        "triton_http_endpoint": f"127.0.0.1:{e.http}",
        "triton_grpc_endpoint": f"127.0.0.1:{e.grpc}",
        "triton_metrics_url": f"http://127.0.0.1:{e.metrics}/metrics",
        "triton_output_path": str(run.work / "tritonserver.log"),
        "client_protocol": "http",
        "perf_analyzer_path": str(run.perf_analyzer),
        "perf_analyzer_flags": run.measuring.flags(),
        "perf_analyzer_timeout": PERF_ANALYZER_TIMEOUT_S,
        "perf_output": True,
        "perf_output_path": str(run.work / "perf_analyzer.log"),
        "output_model_repository_path": str(run.work / "output_model_repository"),
        "override_output_model_repository": True,
        "checkpoint_directory": str(run.work / "checkpoints"),
        "export_path": str(run.report),
        # Model Analyzer's CPU metrics are the RAM of the process it started (tune_launch), not of the
        # python-backend stubs that hold the model: not worth their warning that they perturb the measurement.
        "collect_cpu_metrics": False,
        "num_configs_per_model": min(3, space.model_configs),
        "inference_output_fields": _INFERENCE_FIELDS,
        "skip_detailed_reports": False,
    }


# The default columns and the p95 the constraint is on, and the queue/compute split.
_INFERENCE_FIELDS = [
    "model_name",
    "batch_size",
    "concurrency",
    "model_config_path",
    "instance_group",
    "max_batch_size",
    "satisfies_constraints",
    "perf_throughput",
    "perf_latency_p95",
    "perf_latency_p99",
    "perf_server_queue",
    "perf_server_compute_infer",
]


def config_text(config: dict) -> str:
    """The config as Model Analyzer reads it (JSON is YAML)."""
    return json.dumps(config, indent=2) + "\n"


def instance_kind(target: Target) -> InstanceKind:
    return InstanceKind.GPU if target is Target.GPU else InstanceKind.CPU
