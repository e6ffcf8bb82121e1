"""``hrnet-triton tune``'s options, and the :class:`TuneRequest` and ports they make."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from hrnet_core.contract import INPUT_KINDS
from hrnet_core.errors import HrnetTritonError

from .tune_config import (
    DEFAULT_MAX_TRIALS,
    DEFAULT_STABILITY_PERCENT,
    DEFAULT_WINDOW_REQUESTS,
    Endpoints,
    Measuring,
    SearchSpace,
)


def _ints(text: str, low: int, high: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < low or (high is not None and max(values) > high):
        within = f">= {low}" if high is None else f"in {low}..{high}"
        raise argparse.ArgumentTypeError(f"takes integers {within} separated by commas, e.g. 1,2; got {text!r}")
    return values


def _positive_ints(text: str) -> tuple[int, ...]:
    return _ints(text, 1)


def _non_negative_ints(text: str) -> tuple[int, ...]:
    return _ints(text, 0)


def _ports(text: str) -> tuple[int, ...]:
    return _ints(text, 1, 65535)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of 1 or more, got {text!r}")
    return value


def _kinds(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if any(v not in INPUT_KINDS for v in values):
        raise argparse.ArgumentTypeError(f"takes input kinds of {','.join(INPUT_KINDS)}, comma-separated; got {text!r}")
    return values


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def add_tune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("variant", help="seed model name, e.g. HRNet_W18_C")
    p.add_argument(
        "--target",
        choices=["cpu", "onnx", "gpu"],
        default="cpu",
        help="the repository target to tune (default: cpu; gpu and onnx need NVIDIA's Triton container, or use "
        "--config-only)",
    )
    p.add_argument("--slo-ms", type=_positive_float, required=True, help="the p95 latency limit, in ms")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the repository to write the winner to (replaced whole; apart from --report)",
    )
    p.add_argument(
        "--report", type=Path, required=True, help="where Model Analyzer's results, HTML reports and logs are kept"
    )
    p.add_argument("--onnx-dir", type=Path, help="directory of exported <variant>.onnx files (cpu and onnx targets)")
    p.add_argument("--plans-dir", type=Path, help="directory of plans built by `engine` (gpu target)")
    p.add_argument(
        "--inputs",
        type=_kinds,
        default=list(INPUT_KINDS),
        help="the entry points to write to --out, as `repo --inputs` (default: all three)",
    )
    _search_options(p)
    _run_options(p)


def _search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search space (default: the target's, docs/tune.md)")
    g.add_argument("--instances", type=_positive_ints, help="instance counts to try, e.g. 1,2")
    g.add_argument("--max-batch", type=_positive_ints, help="max_batch_size values to try, e.g. 1,8")
    g.add_argument(
        "--queue-delay-us", type=_non_negative_ints, help="dynamic batching max_queue_delay_microseconds, e.g. 0,2000"
    )
    g.add_argument("--concurrency", type=_positive_ints, help="client concurrencies each config is measured at")
    g.add_argument("--request-batch", type=_positive_int, default=1, help="images per request (default: %(default)s)")
    g.add_argument(
        "--window-requests",
        type=_positive_int,
        default=DEFAULT_WINDOW_REQUESTS,
        help="perf_analyzer: requests per measurement window (default: %(default)s)",
    )
    g.add_argument(
        "--stability-percent",
        type=_positive_int,
        default=DEFAULT_STABILITY_PERCENT,
        help="perf_analyzer: windows count as stable within this %% (default: %(default)s)",
    )
    g.add_argument(
        "--max-trials",
        type=_positive_int,
        default=DEFAULT_MAX_TRIALS,
        help="perf_analyzer: at most this many windows per point (default: %(default)s)",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running Model Analyzer")
    g.add_argument(
        "--ports",
        type=_ports,
        help="HTTP,gRPC,metrics ports of the servers Model Analyzer starts on 127.0.0.1 (default: three free ones)",
    )
    g.add_argument("--serve-env", type=Path, help="the python backend's numpy<2 environment (default: .venv-serve)")
    g.add_argument("--tools-env", type=Path, help="the perf_analyzer/Model Analyzer environment (default: .venv-tools)")
    g.add_argument(
        "--triton-server",
        type=Path,
        help="a full tritonserver binary to launch instead of the nvidia-pytriton wheel's (gpu default: "
        "/opt/tritonserver/bin/tritonserver, NVIDIA's container)",
    )
    g.add_argument(
        "--gpu-memory-mb",
        type=_positive_float,
        help="gpu target: also constrain the GPU memory one model may use, in MB (Model Analyzer's gpu_used_memory; "
        "docs/gpu-memory.md gives the per-model budget)",
    )
    g.add_argument(
        "--resume",
        type=Path,
        metavar="REPORT",
        help="reuse the measurements in an earlier --report of the same search (Model Analyzer's checkpoint): "
        "only what it lacks is measured, e.g. to judge the search again with another --slo-ms",
    )
    g.add_argument(
        "--config-only",
        action="store_true",
        help="write Model Analyzer's config and base repository into --report and stop (e.g. for a GPU host)",
    )


def search_space(args: argparse.Namespace, default: SearchSpace) -> SearchSpace:
    return SearchSpace(
        instances=args.instances or default.instances,
        max_batch_sizes=args.max_batch or default.max_batch_sizes,
        queue_delays_us=args.queue_delay_us if args.queue_delay_us is not None else default.queue_delays_us,
        concurrency=args.concurrency or default.concurrency,
        request_batch=args.request_batch,
    )


def measuring(args: argparse.Namespace) -> Measuring:
    return Measuring(args.window_requests, args.stability_percent, args.max_trials)


def endpoints(ports: tuple[int, ...] | None) -> Endpoints:
    """The given three ports, or three free ones."""
    if ports is not None:
        if len(ports) != 3 or len(set(ports)) != 3:
            raise HrnetTritonError(f"--ports takes three different ports HTTP,gRPC,metrics; got {ports}")
        return Endpoints(*ports)
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return Endpoints(*(s.getsockname()[1] for s in socks))
    finally:
        for s in socks:
            s.close()


def resumed_ports(report: Path) -> tuple[int, int, int]:
    """The earlier run's ports: Model Analyzer's checkpoint keys hold the metrics URL, so a resumed run must match."""
    try:
        cfg = json.loads((report / "model_analyzer.yaml").read_text())
        http, grpc = (int(cfg[f"triton_{k}_endpoint"].rsplit(":", 1)[1]) for k in ("http", "grpc"))
        metrics = int(cfg["triton_metrics_url"].rsplit(":", 1)[1].split("/")[0])
    except (OSError, ValueError, KeyError) as err:
        raise HrnetTritonError(f"{report}/model_analyzer.yaml cannot be read ({err}); name a --report of tune") from err
    return http, grpc, metrics
