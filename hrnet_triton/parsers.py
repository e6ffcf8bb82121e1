"""The ``hrnet-triton`` command line's options: one subparser per command, shared groups as parents.

Every option has help text; options several commands share (the local server's ports, the
server to ask, the pixel limit, progress bars) are defined once, as argparse parent parsers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV, INPUT_KINDS, MAX_PIXELS

Command = Callable[[argparse.Namespace], int]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes positive integers separated by commas, e.g. 1,2,4; got {text!r}")
    return values


def kind_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not values or any(v not in INPUT_KINDS for v in values):
        raise argparse.ArgumentTypeError(
            f"takes input kinds separated by commas, of {','.join(INPUT_KINDS)}; got {text!r}"
        )
    return values


def _parent(build: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    build(parser)
    return parser


def _local_server(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("local Triton server")
    g.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    g.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: %(default)s)")
    g.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default: %(default)s)")
    g.add_argument(
        "--serve-env", type=Path, help="the numpy<2 environment the python backend runs in (default: .venv-serve)"
    )
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on, e.g. 0.0.0.0 for every interface (default: %(default)s, this machine only)",
    )
    g.add_argument(
        "--admin-key",
        help=f"the key Triton's admin APIs (statistics, shared memory, logging, ...) require in header "
        f"{ADMIN_HEADER!r} (default: ${ADMIN_KEY_ENV}, else a random one, printed); prefer the variable: "
        "options show in `ps`",
    )


def _remote_server(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Triton server to ask")
    g.add_argument("--url", help="a Triton server, e.g. localhost:8000 (HTTP) or localhost:8001 (gRPC)")
    g.add_argument(
        "--model",
        help="the variant on the server, e.g. HRNet_W18_C, or one of its served models, e.g. HRNet_W18_C_image",
    )
    g.add_argument("--protocol", choices=["http", "grpc"], default="http", help="how to talk to --url (default: http)")


def _pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels",
        type=positive,
        default=MAX_PIXELS,
        help=f"refuse images with more pixels than this, before decoding (default: {MAX_PIXELS:,})",
    )


def _progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(description: str, version: str, commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hrnet-triton", description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = {
        "server": _parent(_local_server),
        "remote": _parent(_remote_server),
        "pixels": _parent(_pixels),
        "progress": _parent(_progress),
    }
    for name, add in _SUBCOMMANDS.items():
        p = add(sub, parents)
        p.set_defaults(func=commands[name])
    return parser


def _variants(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser("variants", help="list the ten seed HRNet variants")
    p.add_argument("--json", action="store_true", help="machine-readable output, with weight URLs")
    p.add_argument("--urls", action="store_true", help="also print PaddleClas's weight locations")
    return p


def _export(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        parents=[parents["progress"]],
        help="PaddleClas weights -> Paddle inference model -> parity-checked ONNX",
    )
    p.add_argument("variant", help="seed model name, e.g. HRNet_W18_C")
    p.add_argument(
        "--weights",
        default="auto",
        help="'auto' (download PaddleClas's pretrained weights once), 'offline' (seeded, calibrated; labels "
        "meaningless), a .pdparams file, or a *_infer.tar / inference-model directory (default: auto)",
    )
    p.add_argument("--out", type=Path, required=True, help="the ONNX file to write (X.onnx; X.onnx.json beside it)")
    p.add_argument("--paddle-model-dir", type=Path, help="also keep the Paddle inference model in this directory")
    p.add_argument("--cache-dir", type=Path, help="where downloads go (default: $HRNET_TRITON_CACHE or the user cache)")
    p.add_argument(
        "--allow-unpinned-weights",
        action="store_true",
        help="with --weights auto, download weights that have no SHA-256 pinned in the variant table "
        "(a tampered or damaged file would go unnoticed)",
    )
    return p


def _engine(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser("engine", help="ONNX -> TensorRT plan with a batch profile, checked against ONNX Runtime")
    p.add_argument("variant", help="seed model name, e.g. HRNet_W18_C")
    p.add_argument("--onnx", type=Path, required=True, help="the exported ONNX model")
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="the plan's precision (default: fp16)")
    p.add_argument("--max-batch", type=positive, default=32, help="the profile's maximum batch (default: 32)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="the plan to write (X.plan; X.plan.json beside it)")
    where.add_argument(
        "--plans-dir", type=Path,
        help="write the plan into this directory as <variant>.sm<CC>.<precision>.plan, CC read from this GPU",
    )  # fmt: skip
    p.add_argument(
        "--timing-cache", type=Path,
        help="persistent timing cache (default: timing.trt<VERSION>.<GPU>.cache beside the plan)",
    )  # fmt: skip
    p.add_argument(
        "--skip-if-current",
        action="store_true",
        help="keep an existing plan built from the same ONNX file for this GPU, TensorRT version, precision and "
        "profile (its .plan.json says so)",
    )
    return p


def _repo(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser("repo", help="write a Triton model repository (configs, labels, models)")
    p.add_argument(
        "--target",
        choices=["gpu", "onnx", "cpu"],
        required=True,
        help="gpu: TensorRT plans; onnx: Triton's openvino (or onnxruntime) backend, for the NGC image; "
        "cpu: the python backend running OpenVINO (or ONNX Runtime), for the local server",
    )
    p.add_argument("--variants", nargs="+", metavar="NAME", help="seed model names (default: all ten)")
    p.add_argument("--onnx-dir", type=Path, help="directory of exported <NAME>.onnx files (onnx and cpu targets)")
    p.add_argument("--out", type=Path, required=True, help="the repository directory to write")
    p.add_argument("--plans-dir", type=Path, help="directory of plans built by `engine` (gpu target; one per GPU arch)")
    p.add_argument(
        "--precision", choices=["fp16", "fp32", "bf16"],
        help="gpu target: install the plans of this precision from --plans-dir (fp16, fp32; default fp16). "
        "cpu and onnx targets: the runtime's precision (fp32, or bf16 with openvino on a CPU with native BF16; "
        "default fp32), gated against ONNX Runtime on the sample photographs (docs/cpu-speed.md)",
    )  # fmt: skip
    p.add_argument(
        "--runtime", choices=["openvino", "onnxruntime"],
        help="cpu and onnx targets: the runtime that runs the ONNX model (default: openvino)",
    )  # fmt: skip
    p.add_argument(
        "--inputs", type=kind_list, default=list(INPUT_KINDS),
        help="the entry points to write per variant: tensor (<V>), uint8 (<V>_uint8), image (<V>_image, "
        "which needs tensor), comma-separated (default: all three; docs/inputs.md)",
    )  # fmt: skip
    p.add_argument(
        "--threads",
        type=positive,
        help="runtime threads per instance: cpu target (default 1), onnx target (default: one per core of the "
        "machine; set it to the container's CPU limit)",
    )
    p.add_argument("--instance-kind", choices=["cpu", "gpu"], help="override the target's instance kind")
    p.add_argument(
        "--max-batch", type=positive, help="max_batch_size (default: the target's; gpu: the plans' profile max)"
    )
    p.add_argument("--instances", type=positive, help="model instances (instance_group count; default: the target's)")
    p.add_argument(
        "--max-queue-size",
        type=int,
        help="requests waiting beyond this are rejected at once (default: the target's; 0: unbounded)",
    )
    return p


def _serve(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        parents=[parents["server"]],
        help="run a real Triton server (the nvidia-pytriton wheel's) on a model repository until Ctrl-C/SIGTERM",
    )
    p.add_argument("--repo", type=Path, required=True, help="the model repository (e.g. from `repo --target cpu`)")
    return p


def _demo(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        parents=[parents["server"], parents["progress"]],
        help="export, write the cpu repository, serve it, classify the samples over HTTP and gRPC",
    )
    p.add_argument("--variant", default="HRNet_W18_C", help="the seed model to run (default: %(default)s)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("artifacts"),
        help="where the model, repository and log go (default: %(default)s)",
    )
    p.add_argument("--top-k", type=positive, default=3, help="classes printed per image (default: %(default)s)")
    p.add_argument("--keep-serving", action="store_true", help="keep the server running after the demo")
    return p


def seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _classify(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "classify", parents=[parents["remote"], parents["pixels"]], help="top-k ImageNet labels for image files"
    )
    p.add_argument("images", nargs="*", type=Path, help="image files (JPEG, PNG, BMP, TIFF, WebP)")
    p.add_argument("--samples", action="store_true", help="also classify the bundled sample photographs")
    p.add_argument("--onnx", type=Path, help="classify in-process with this exported ONNX model instead of --url")
    p.add_argument("--top-k", type=positive, default=5, help="how many classes per image (default: 5)")
    p.add_argument("--batch-size", type=positive, default=8, help="images per inference call (default: 8)")
    p.add_argument("--workers", type=positive, help="threads decoding images (default: one per core, up to 8)")
    p.add_argument(
        "--files-from",
        metavar="FILE",
        help="also classify the paths listed in FILE, one a line ('-': standard input), read as the run goes",
    )
    p.add_argument(
        "--max-bytes",
        type=positive,
        help="refuse image files larger than this, unread (default: 3 bytes per --max-pixels pixel + 1 MiB)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output: a JSON array, one element a line")
    _classify_with_a_server(p)
    return p


def _classify_with_a_server(p: argparse.ArgumentParser) -> None:
    """``classify``'s options for a server (--url): what is sent, how, and how faults are ridden out."""
    p.add_argument(
        "--input",
        choices=INPUT_KINDS,
        help="what is sent, with --url: tensor (preprocessed float32), uint8 (the 224x224 crop) or image (the "
        "file's bytes, decoded on the server). Default: the best the server offers for --model: image, else "
        "uint8, else tensor",
    )
    p.add_argument(
        "--concurrency", type=positive, default=1, help="requests in flight at once, with --url (default: 1)"
    )
    p.add_argument(
        "--shared-memory",
        action="store_true",
        help="pass tensors or uint8 crops through system shared memory (the server must run on this host)",
    )
    p.add_argument(
        "--server-top-k",
        action="store_true",
        help="let the server pick the top-k (Triton's classification extension) instead of the client",
    )
    p.add_argument(
        "--retry-seconds",
        type=seconds,
        default=30.0,
        help="with --url, resend a batch that found the server gone or overloaded, with backoff, until the "
        "outage has lasted this long (default: %(default)g; 0: never)",
    )
    p.add_argument(
        "--grpc-round-robin",
        action="store_true",
        help="with --protocol grpc, send each request to the next of the servers --url resolves to, e.g. "
        "dns:///triton-grpc.hrnet-triton:8001 (a headless Service) or ipv4:10.0.0.1:8001,10.0.0.2:8001",
    )
    p.add_argument(
        "--admin-key",
        default=None,
        help="the server's admin key, for --shared-memory when its admin APIs are restricted "
        "(default: $HRNET_TRITON_ADMIN_KEY; prefer the variable, which other users cannot see in ps)",
    )


def _preprocess(sub, parents) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "preprocess",
        parents=[parents["remote"], parents["pixels"]],
        help="write the float32 NCHW tensor (or uint8 NHWC crop) `classify` would send for an image",
    )
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument(
        "--out", type=Path, required=True, help="the .npy file to write ([1, 3, 224, 224] or [1, 224, 224, 3])"
    )
    p.add_argument(
        "--input",
        choices=["tensor", "uint8"],
        default="tensor",
        help="tensor: float32 NCHW, normalised; uint8: the 224x224 RGB crop, NHWC (default: %(default)s)",
    )
    return p


def _bench(sub, parents) -> argparse.ArgumentParser:
    from hrnet_triton.perf_options import add_bench_options

    p = sub.add_parser(
        "bench",
        help="sweep batch size and load with perf_analyzer and Locust side by side; tables, CSV, JSON and plot",
    )
    add_bench_options(p)
    return p


def _tune(sub, parents) -> argparse.ArgumentParser:
    from hrnet_triton.tune_options import add_tune_options

    p = sub.add_parser(
        "tune",
        help="search instances, max batch and queue delay with NVIDIA's Model Analyzer for the best throughput "
        "within a p95 SLO; write the winner as a repository (docs/tune.md)",
    )
    add_tune_options(p)
    return p


_SUBCOMMANDS = {
    "variants": _variants,
    "export": _export,
    "engine": _engine,
    "repo": _repo,
    "serve": _serve,
    "demo": _demo,
    "classify": _classify,
    "preprocess": _preprocess,
    "bench": _bench,
    "tune": _tune,
}
