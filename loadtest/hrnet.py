"""Locust load test for HRNet classifiers served by Triton, over HTTP or gRPC.

    locust -f loadtest/hrnet.py --host http://127.0.0.1:8000                      # web UI on :8089
    locust -f loadtest/hrnet.py --host http://127.0.0.1:8000 --headless -u 4 -t 60s \\
        --model HRNet_W18_C --protocol grpc --batch-size 8 --max-p95-ms 2000 --csv out/w18
    locust -f loadtest/hrnet.py --host http://127.0.0.1:8000 HrnetGrpcUser        # a User class by name
    python loadtest/hrnet.py                                   # this file's options, with their help

This file is the entry point: it declares the options (below) and imports the users, the load
shape and the report from the ``hrnet_loadtest`` package. Locust prints ``--help`` before it loads
a locustfile, so ``locust --help`` lists none of these options; the web UI shows them all, with
their help, and a run started there uses the values in its form. Every option also reads a
``LOCUST_…`` environment variable (``--batch-size``: ``LOCUST_BATCH_SIZE``) and a ``locust.conf``
line (``batch-size = 8``). docs/loadtest.md has the reference.

Each answer is checked (its shape, a probability distribution per row; with --top-k, classes in the
label set and probabilities in order); a wrong answer counts as a failure. The end-of-run line gives the goodput.
"""

from __future__ import annotations

import argparse
import sys

try:
    import hrnet_loadtest.report  # noqa: F401 - the end-of-run summary and thresholds (a quitting listener)
    from hrnet_loadtest.shape import HrnetShape
    from hrnet_loadtest.users import HrnetGrpcUser, HrnetHttpUser
    from hrnet_loadtest.workload import CHOICES
except ImportError as err:  # this file is newer than the installed package (an old loadtest image, say)
    raise SystemExit(
        f"{__file__} needs the hrnet_loadtest package of the same version ({err}): install this checkout "
        "(pip install '.[loadtest]'), or rebuild the loadtest image (k8s/README.md, step 1)"
    ) from err
from locust import events

__all__ = ["HrnetGrpcUser", "HrnetHttpUser", "HrnetShape"]  # Locust finds the classes in this module

# Every option, with its default and help. Each is shown (and editable) in the web UI, and reads
# LOCUST_<NAME> (--batch-size: LOCUST_BATCH_SIZE) and locust.conf. Users read them when they start.
OPTIONS: dict[str, dict] = {
    "--model": dict(default="HRNet_W18_C", help="the variant on the server, or a served model (HRNet_W18_C_image)"),
    "--input": dict(
        choices=CHOICES["input"], default="best",
        help="what is sent: tensor, uint8 (the crop) or image (the files' bytes); best: what the server offers "
        "best for --model, image, else uint8, else tensor",
    ),
    "--protocol": dict(
        choices=CHOICES["protocol"], default="http",
        help="when no User class is named (HrnetHttpUser, HrnetGrpcUser): HTTP to --host, gRPC to --grpc-port on "
        "--host's machine, or both (half the users each)",
    ),
    "--grpc-port": dict(type=int, default=8001, help="gRPC port on the --host's machine (default 8001)"),
    "--batch-size": dict(type=int, default=1, help="images per request"),
    "--payload": dict(
        choices=CHOICES["payload"], default="tensor",
        help="tensor: the images, in --input's form; tiny: a 1x1-pixel float32 tensor per image (whatever "
        "--input), to measure the harness itself against a model that accepts any size",
    ),
    "--images": dict(default="", help="a folder of images (default: the bundled sample photographs)"),
    "--top-k": dict(
        type=int, default=0, help="ask the server for the top-k (classification extension); 0: full probabilities"
    ),
    "--preprocess-in-loop": dict(action="store_true", help="decode and preprocess on every request, not once per user"),
    "--target-rps": dict(
        type=float, default=0.0,
        help="open loop: the run sends this many requests/s in all, shared by its users (each paced with Locust's "
        "constant_throughput, one request in flight each: use enough users); 0: closed loop, as fast as answered",
    ),
    "--shape": dict(
        choices=CHOICES["shape"], default="constant",
        help="constant: -u users at once; step: add --step-users every --step-seconds up to -u; ramp: from 0 to -u "
        "users linearly over --ramp-seconds",
    ),
    "--step-users": dict(type=int, default=1, help="with --shape step: users added at each step (default 1)"),
    "--step-seconds": dict(type=float, default=30.0, help="with --shape step: seconds between steps (default 30)"),
    "--ramp-seconds": dict(type=float, default=60.0, help="with --shape ramp: seconds from 0 to -u users (default 60)"),
    "--failure-backoff-ms": dict(
        type=float, default=100.0,
        help="after a failed request the user waits this long (with jitter) before its next one, doubling with each "
        "failure in a row up to --failure-backoff-max-ms; a success resets it (default 100; 0: retry at once)",
    ),
    "--failure-backoff-max-ms": dict(type=float, default=5000.0, help="the longest wait after failures (default 5000)"),
    "--max-p95-ms": dict(
        type=float, default=0.0, help="exit non-zero if the 95th-percentile latency is above this (0: no limit)"
    ),
    "--max-failure-ratio": dict(
        type=float, default=-1.0,
        help="exit non-zero if more than this fraction of requests failed (default -1: any failure)",
    ),
}  # fmt: skip


def add_options(parser) -> None:
    """Add every option to ``parser`` with ``parser.add_argument``, which Locust's web UI lists
    (``include_in_web_ui``); an argument group would hide them from it."""
    for flag, settings in OPTIONS.items():
        env_var = "LOCUST_" + flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, env_var=env_var, include_in_web_ui=True, **settings)


events.init_command_line_parser.add_listener(add_options)


def options_help() -> str:
    """This file's options as ``--help`` would list them, for ``python loadtest/hrnet.py``."""
    from locust.argument_parser import LocustArgumentParser

    parser = LocustArgumentParser(
        prog="locust -f loadtest/hrnet.py", add_help=False, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_options(parser)
    return parser.format_help()


if __name__ == "__main__":  # pragma: no cover - a convenience: Locust itself never runs this
    sys.stdout.write(options_help())
