"""``hrnet-triton bench``'s options, and the :class:`~hrnet_triton.bench.BenchConfig` they make.

Kept out of ``parsers.py`` (which holds one small function per command) because bench has many:
what to sweep, which tools, how perf_analyzer measures, and what the report draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hrnet_core.contract import ADMIN_KEY_ENV
from hrnet_triton.parsers import kind_list, positive, positive_list

TOOL_NAMES = ("perf_analyzer", "locust")


def _tools(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values or any(v not in TOOL_NAMES for v in values):
        raise argparse.ArgumentTypeError(f"takes {','.join(TOOL_NAMES)} (one or both, comma-separated); got {text!r}")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"takes a positive number of seconds, e.g. 5 or 0.5; got {text!r}")
    return value


def _rates(text: str) -> list[float] | str:
    if text in ("auto", "none"):
        return "auto" if text == "auto" else []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"takes auto, none, or request rates per second like 2,4.5,8; got {text!r}")
    return values


def add_bench_options(p: argparse.ArgumentParser) -> None:
    """Every bench option, each with its help."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address (default: %(default)s)")
    p.add_argument("--model", default="HRNet_W18_C", help="the model's name on the server (default: %(default)s)")
    p.add_argument(
        "--protocol", choices=["http", "grpc"], default="http",
        help="what both tools send (statistics and metadata always use HTTP) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--grpc-port", type=int, default=8001, help="the server's gRPC port, for --protocol grpc (default: %(default)s)"
    )
    p.add_argument(
        "--metrics-url", help="the server's Prometheus metrics, for GPU figures (default: the --url host, port 8002)"
    )
    p.add_argument(
        "--batch-sizes", type=positive_list, default=[1, 8], help="images per request, comma-separated (default: 1,8)"
    )
    p.add_argument(
        "--concurrency", type=positive_list, default=[1, 2, 4, 8],
        help="closed loop: requests in flight (perf_analyzer) = Locust users, comma-separated (default: 1,2,4,8)",
    )  # fmt: skip
    p.add_argument(
        "--request-rates", type=_rates, default="auto",
        help="open loop, perf_analyzer only: requests/s, comma-separated; auto: 50%%, 75%% and 100%% of the "
        "closed loop's peak; none: skip (default: auto)",
    )  # fmt: skip
    p.add_argument(
        "--request-distribution", choices=["constant", "poisson"], default="constant",
        help="open loop: the intervals between requests (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--inputs", type=kind_list,
        help="what is sent, comma-separated, of tensor,uint8,image; each a point of the sweep "
        "(default: the best the server offers for --model)",
    )  # fmt: skip
    p.add_argument(
        "--tools", type=_tools, default=TOOL_NAMES,
        help="perf_analyzer, locust or both, measured one after the other at each point (default: both)",
    )  # fmt: skip
    p.add_argument("--seconds", type=_seconds, default=20, help="Locust's run per point, in seconds (default: 20)")
    _perf_options(p)
    p.add_argument("--slo-ms", type=float, help="the latency objective, drawn as a line on the plot (default: none)")
    p.add_argument(
        "--admin-key",
        help=f"the server's admin key, for its statistics API (default: ${ADMIN_KEY_ENV}); prefer the variable: "
        "options show in `ps`",
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench"), help="where bench.csv/.json/.md/.png go (default: bench/)"
    )


def _perf_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perf_analyzer's measurement (repeated until stable)")
    g.add_argument(
        "--window-seconds", type=_seconds, default=5.0, help="the length of one measurement window (default: 5)"
    )
    g.add_argument(
        "--window-requests", type=positive,
        help="count windows instead: at least this many requests per window (default: time windows)",
    )  # fmt: skip
    g.add_argument(
        "--stability-percentage", type=float, default=10.0,
        help="stable when the last 3 windows' throughput and latency agree within this %% (default: 10)",
    )  # fmt: skip
    g.add_argument(
        "--max-trials", type=positive, default=6,
        help="windows before giving up on stability; the point is then measured once more, unchecked, "
        "and reported as not stable (default: 6)",
    )  # fmt: skip


def bench_config(args: argparse.Namespace):
    """The :class:`~hrnet_triton.bench.BenchConfig` of parsed bench options."""
    from hrnet_triton.bench import BenchConfig
    from hrnet_triton.perf import PerfSettings

    perf = PerfSettings(
        args.window_seconds, args.window_requests, args.stability_percentage, args.max_trials, args.request_distribution
    )
    return BenchConfig(
        url=args.url, model=args.model, batch_sizes=args.batch_sizes, concurrencies=args.concurrency,
        protocol=args.protocol, grpc_port=args.grpc_port, metrics_url=args.metrics_url, inputs=args.inputs,
        request_rates=args.request_rates, seconds=args.seconds, tools=args.tools, perf=perf,
        admin_key=args.admin_key,
    )  # fmt: skip
