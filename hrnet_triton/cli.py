"""``hrnet-triton``: one command line for every stage.

Subcommands: ``variants`` (the seed table), ``export`` (weights -> ONNX, parity-gated),
``engine`` (ONNX -> TensorRT plan), ``repo`` (a Triton model repository), ``serve`` (a local
Triton server), ``classify`` (top-k labels, in-process or through Triton), ``preprocess`` (the tensor
``classify`` sends), ``bench`` (a Locust sweep), ``demo`` (the main job). Each subcommand is a thin layer over a typed
function of its stage; errors of the project's family are printed as one message, with exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from hrnet_triton import __version__, variants
from hrnet_triton.errors import HrnetTritonError

log = logging.getLogger("hrnet_triton")


def _cmd_variants(args: argparse.Namespace) -> int:
    rows = variants.VARIANTS
    if args.json:
        print(json.dumps(
            [{**v.__dict__, "flavour": v.flavour.value, "pretrained_url": v.pretrained_url,
              "inference_url": v.inference_url} for v in rows], indent=2))  # fmt: skip
        return 0

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    head = f"{'model':<20} {'width':>5} {'SE':>3} {'weights':<8} {'top1':>6} {'top5':>6} {'ref1':>6} {'ref5':>6} {'GFLOPs':>7} {'Mparams':>8}"
    print(head)
    for v in rows:
        print(
            f"{v.name:<20} {v.width:>5} {'yes' if v.has_se else 'no':>3} {v.flavour.value:<8} {pct(v.top1):>6} "
            f"{pct(v.top5):>6} {pct(v.ref_top1):>6} {pct(v.ref_top5):>6} {v.flops_g:>7.2f} {v.params_m:>8.2f}"
        )
    if args.urls:
        print()
        for v in rows:
            print(f"{v.name}\n  pretrained: {v.pretrained_url}\n  inference:  {v.inference_url}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from hrnet_build.export import export_onnx, manifest_path
    from hrnet_build.weights import WeightsSpec

    variant = variants.get(args.variant)
    spec = WeightsSpec.parse(args.weights)
    manifest = export_onnx(
        variant, spec, args.out,
        paddle_model_dir=args.paddle_model_dir, cache=args.cache_dir, progress=not args.no_progress,
    )  # fmt: skip
    p = manifest.parity
    print(
        f"{variant.name}: wrote {args.out} ({manifest.onnx_bytes / 1e6:.1f} MB) and {manifest_path(args.out)}\n"
        f"  input {manifest.input.name} {list(manifest.input.dims)} {manifest.input.dtype} -> "
        f"output {manifest.output.name} {list(manifest.output.dims)} {manifest.output.dtype}\n"
        f"  parity (Paddle Inference vs ONNX Runtime, {len(p.images)} photographs): max |Δprob| {p.max_abs_diff:.2e}, "
        f"top-5 identical: {p.top5_identical}; top-1 probability {p.min_top1_prob:.3f}..{p.max_top1_prob:.3f}\n"
        f"  {manifest.export_seconds:.0f} s, peak RSS {manifest.peak_rss_mib:.0f} MiB"
    )
    if not manifest.weights["labels_meaningful"]:
        print("  NOTE: offline weights: the model's labels are meaningless.")
    return 0


def _cmd_engine(args: argparse.Namespace) -> int:
    from hrnet_build.engine import Precision, Profile, engine, require_tensorrt, stale_reason

    if args.skip_if_current:
        import ctypes

        from hrnet_build.engine import _gpu_name_and_cc

        trt = require_tensorrt()
        _, cc = _gpu_name_and_cc(ctypes)
        reason = stale_reason(args.out, args.onnx, Precision(args.precision), Profile.for_max(args.max_batch),
                              tensorrt_version=trt.__version__, compute_capability=cc)  # fmt: skip
        if reason is None:
            print(f"{args.variant}: {args.out} is current (same ONNX, GPU architecture {cc}, TensorRT "
                  f"{trt.__version__}, precision and profile): skipped")  # fmt: skip
            return 0
        log.info("%s: building %s: %s", args.variant, args.out, reason)
    m = engine(
        variants.get(args.variant), args.onnx, args.out, precision=Precision(args.precision),
        max_batch=args.max_batch, timing_cache=args.timing_cache,
    )  # fmt: skip
    print(
        f"{m.variant}: {m.precision} plan for {m.gpu_name} (cc {m.compute_capability}), TensorRT {m.tensorrt_version}, "
        f"profile {m.profile.min}/{m.profile.opt}/{m.profile.max} -> {args.out}\n"
        f"  vs ONNX Runtime: max |Δprob| {m.parity['max_abs_dprob']:.2e}, min top-5 overlap {m.parity['min_top5_overlap']}/5"
    )
    return 0


def _cmd_repo(args: argparse.Namespace) -> int:
    from hrnet_build.repository import Target, write_repository

    target = Target(args.target)
    chosen = [variants.get(n) for n in (args.variants or variants.names())]
    if target is not Target.GPU and args.onnx_dir is None:
        log.warning("no --onnx-dir: writing configs and labels only; put each model.onnx in <model>/1/ yourself")
    written = write_repository(
        target, chosen, args.out, onnx_dir=args.onnx_dir, plans_dir=args.plans_dir, threads=args.threads,
        instance_kind=args.instance_kind, max_batch=args.max_batch, max_queue_size=args.max_queue_size,
        instances=args.instances,
    )
    print(f"wrote {len(written)} {target.value}-target model(s) to {args.out}: {', '.join(p.name for p in written)}")
    return 0


def _on_sigterm_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C, so servers are stopped by the same clean-up path."""
    import signal

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


def _cmd_serve(args: argparse.Namespace) -> int:
    from hrnet_triton.server import LocalTritonServer, Ports, default_serve_env

    if args.target == "gpu":
        from hrnet_triton import release

        raise HrnetTritonError(
            "--target gpu runs the NGC container, which needs Docker and an NVIDIA GPU; neither is usable here. On a GPU "
            f"host: docker run --rm --gpus all -p {args.http_port}:8000 -p {args.grpc_port}:8001 -p {args.metrics_port}:8002 "
            f"-v $PWD/{args.repo}:/models {release.TRITON_IMAGE} tritonserver --model-repository=/models"
        )
    _on_sigterm_interrupt()
    server = LocalTritonServer(
        args.repo, serve_env=args.serve_env or default_serve_env(),
        ports=Ports(args.http_port, args.grpc_port, args.metrics_port), forward_log=True,
    )  # fmt: skip
    try:
        server.start()
        print(
            f"Triton is serving {args.repo}: HTTP {server.http_url}, gRPC 127.0.0.1:{args.grpc_port}, "
            f"metrics http://127.0.0.1:{args.metrics_port}/metrics. Ctrl-C stops it.", flush=True,
        )  # fmt: skip
        return server.wait()
    except KeyboardInterrupt:
        print("stopping Triton", file=sys.stderr)
        return 0
    finally:
        server.stop()


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job: export, repository, server, classify over HTTP and gRPC."""
    from hrnet_build.export import export_onnx
    from hrnet_build.repository import Target, write_repository
    from hrnet_build.weights import WeightsSpec
    from hrnet_client.classify import format_predictions
    from hrnet_client.samples import sample_images
    from hrnet_client.triton import TritonClassifier
    from hrnet_triton.server import LocalTritonServer, Ports, default_serve_env

    variant = variants.get(args.variant)
    onnx = args.out / f"{variant.name}.onnx"
    if not onnx.is_file():
        m = export_onnx(variant, WeightsSpec.parse("offline"), onnx, progress=not args.no_progress)
        print(
            f"exported {onnx} (offline weights): parity vs Paddle max |Δprob| {m.parity.max_abs_diff:.2e}, "
            f"top-5 identical: {m.parity.top5_identical}"
        )
    repo = args.out / "repository-cpu"
    write_repository(Target.CPU, [variant], repo, onnx_dir=args.out)
    _on_sigterm_interrupt()
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    server = LocalTritonServer(repo, serve_env=args.serve_env or default_serve_env(), ports=ports, log_file=args.out / "triton.log")
    try:
        server.start()
        print(f"Triton {variant.name} (cpu target) at HTTP {server.http_url}, gRPC 127.0.0.1:{ports.grpc}; log {args.out / 'triton.log'}")
        for protocol, port in (("http", ports.http), ("grpc", ports.grpc)):
            with TritonClassifier(f"127.0.0.1:{port}", variant.name, protocol) as classifier:
                preds = classifier.classify_files(sample_images(), k=args.top_k)
            print(f"\n== over {protocol.upper()} ==\n{format_predictions(preds)}", flush=True)
        print("\nNOTE: offline weights: these labels are meaningless (export with --weights auto for real ones).")
        if args.keep_serving:
            print(f"still serving at {server.http_url}; Ctrl-C stops it", flush=True)
            server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        print("Triton stopped", file=sys.stderr)


def _triton_classifier(args: argparse.Namespace, **options):
    from hrnet_client.triton import TritonClassifier

    if not args.model:
        raise HrnetTritonError("--url needs --model, one of the seed names (`hrnet-triton variants`)")
    return TritonClassifier(args.url, args.model, args.protocol, **options)


def _cmd_classify(args: argparse.Namespace) -> int:
    from hrnet_client.classify import OnnxRuntimeClassifier, format_predictions
    from hrnet_client.samples import sample_images

    images = [*args.images, *(sample_images() if args.samples else [])]
    if not images:
        raise HrnetTritonError("no images given: name image files, or pass --samples for the bundled photographs")
    if (args.onnx is None) == (args.url is None):
        raise HrnetTritonError("give either --url (a Triton server) with --model, or --onnx (in-process)")
    if args.onnx is not None:
        if args.shared_memory or args.server_top_k or args.concurrency != 1:
            raise HrnetTritonError("--shared-memory, --server-top-k and --concurrency need a server (--url), not --onnx")
        classifier = OnnxRuntimeClassifier(args.onnx)
    else:
        classifier = _triton_classifier(
            args, concurrency=args.concurrency, shared_memory=args.shared_memory, server_top_k=args.server_top_k
        )
    try:
        preds = classifier.classify_files(
            images, k=args.top_k, batch_size=args.batch_size, workers=args.workers, max_pixels=args.max_pixels
        )
    finally:
        if hasattr(classifier, "close"):
            classifier.close()
    print(format_predictions(preds, as_json=args.json))
    failed = [p for p in preds if p.error]
    if failed:
        log.error("%d of %d images could not be classified", len(failed), len(preds))
        return 2
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    import numpy as np

    from hrnet_client.preprocess import load_tensor
    from hrnet_triton import atomic
    from hrnet_triton.contract import DEFAULT_PREPROCESS

    cfg, source = DEFAULT_PREPROCESS, "PaddleClas's inference_cls.yaml"
    if args.url:
        with _triton_classifier(args) as classifier:
            cfg, source = classifier.cfg, f"{args.model}'s config on {classifier.address}"
    x = load_tensor(args.image, cfg, args.max_pixels)[np.newaxis]
    out = args.out if args.out.suffix == ".npy" else args.out.with_name(args.out.name + ".npy")
    with atomic.atomic_path(out, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, x)
    print(f"{args.image} -> {out}: {x.dtype} {list(x.shape)} (NCHW), parameters from {source}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from datetime import date
    from platform import python_version

    from hrnet_triton.bench import sweep, write_results

    def ints(text: str, option: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise HrnetTritonError(f"{option} takes positive integers separated by commas, e.g. 1,2,4; got {text!r}")
        return values

    points = sweep(
        args.url, args.model, protocol=args.protocol, grpc_port=args.grpc_port,
        batch_sizes=ints(args.batch_sizes, "--batch-sizes"), concurrencies=ints(args.concurrency, "--concurrency"),
        seconds=args.seconds, out=args.out,
    )  # fmt: skip
    title = (f"{args.model} over {args.protocol.upper()} at {args.url}; Locust, {args.seconds:g} s per point; "
             f"{date.today()}, Python {python_version()}")  # fmt: skip
    written = write_results(points, args.out, title)
    print((args.out / "bench.md").read_text())
    print("wrote " + ", ".join(map(str, written)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hrnet_triton.contract import MAX_PIXELS
    parser = argparse.ArgumentParser(prog="hrnet-triton", description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("variants", help="list the ten seed HRNet variants")
    p.add_argument("--json", action="store_true", help="machine-readable output, with weight URLs")
    p.add_argument("--urls", action="store_true", help="also print PaddleClas's weight locations")
    p.set_defaults(func=_cmd_variants)

    p = sub.add_parser("export", help="PaddleClas weights -> Paddle inference model -> parity-checked ONNX")
    p.add_argument("variant", help="seed model name, e.g. HRNet_W18_C")
    p.add_argument(
        "--weights", default="auto",
        help="'auto' (download PaddleClas's pretrained weights once), 'offline' (seeded, calibrated; labels "
        "meaningless), a .pdparams file, or a *_infer.tar / inference-model directory (default: auto)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the ONNX file to write (X.onnx; X.manifest.json beside it)")
    p.add_argument("--paddle-model-dir", type=Path, help="also keep the Paddle inference model in this directory")
    p.add_argument("--cache-dir", type=Path, help="where downloads go (default: $HRNET_TRITON_CACHE or the user cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("engine", help="ONNX -> TensorRT plan with a batch profile, checked against ONNX Runtime")
    p.add_argument("variant", help="seed model name, e.g. HRNet_W18_C")
    p.add_argument("--onnx", type=Path, required=True, help="the exported ONNX model")
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="default: fp16")
    p.add_argument("--max-batch", type=int, default=32, help="the profile's maximum batch (default: 32)")
    p.add_argument("--out", type=Path, required=True, help="the plan to write (X.plan; X.plan.json beside it)")
    p.add_argument("--timing-cache", type=Path, help="persistent timing cache (default: timing.cache beside --out)")
    p.add_argument("--skip-if-current", action="store_true",
                   help="keep an existing plan built from the same ONNX file for this GPU, TensorRT version, "
                   "precision and profile (its .plan.json says so)")  # fmt: skip
    p.set_defaults(func=_cmd_engine)

    p = sub.add_parser("repo", help="write a Triton model repository (configs, labels, models)")
    p.add_argument("--target", choices=["gpu", "onnx", "cpu"], required=True,
                   help="gpu: TensorRT plans; onnx: Triton's onnxruntime backend; cpu: python backend + ONNX Runtime")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="seed model names (default: all ten)")
    p.add_argument("--onnx-dir", type=Path, help="directory of exported <NAME>.onnx files (onnx and cpu targets)")
    p.add_argument("--out", type=Path, required=True, help="the repository directory to write")
    p.add_argument("--plans-dir", type=Path, help="directory of plans built by `engine` (gpu target; one per GPU arch)")
    p.add_argument("--threads", type=int,
                   help="ONNX Runtime threads per instance: cpu target (default 1), onnx target (default: one per "
                   "core of the machine; set it to the container's CPU limit)")  # fmt: skip
    p.add_argument("--instance-kind", choices=["cpu", "gpu"], help="override the target's instance kind")
    p.add_argument("--max-batch", type=int, help="max_batch_size (default: the target's; gpu: the plans' profile max)")
    p.add_argument("--instances", type=int, help="model instances (instance_group count; default: the target's)")
    p.add_argument("--max-queue-size", type=int,
                   help="requests waiting beyond this are rejected at once (default: the target's; 0: unbounded)")
    p.set_defaults(func=_cmd_repo)

    p = sub.add_parser("serve", help="run a real Triton server on a model repository until Ctrl-C/SIGTERM")
    p.add_argument("--repo", type=Path, required=True, help="the model repository (e.g. from `repo --target cpu`)")
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the nvidia-pytriton tritonserver here; gpu: the pinned NGC container (needs Docker + GPU)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--serve-env", type=Path, help="numpy<2 environment for the python backend (default: .venv-serve)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="export, write the cpu repository, serve it, classify the samples over HTTP and gRPC")
    p.add_argument("--variant", default="HRNet_W18_C")
    p.add_argument("--out", type=Path, default=Path("artifacts"))
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--serve-env", type=Path, help="numpy<2 environment for the python backend (default: .venv-serve)")
    p.add_argument("--keep-serving", action="store_true", help="keep the server running after the demo")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("classify", help="top-k ImageNet labels for image files")
    p.add_argument("images", nargs="*", type=Path, help="image files (JPEG, PNG, BMP, TIFF, WebP)")
    p.add_argument("--samples", action="store_true", help="also classify the bundled sample photographs")
    p.add_argument("--url", help="a Triton server, e.g. localhost:8000 (HTTP) or localhost:8001 (gRPC)")
    p.add_argument("--model", help="the model's name on the server, e.g. HRNet_W18_C")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http", help="with --url (default: http)")
    p.add_argument("--onnx", type=Path, help="classify in-process with this exported ONNX model instead")
    p.add_argument("--top-k", type=int, default=5, help="how many classes per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=8, help="images per inference call (default: 8)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once, with --url (default: 1)")
    p.add_argument("--shared-memory", action="store_true",
                   help="pass tensors through system shared memory (the server must run on this host)")
    p.add_argument("--server-top-k", action="store_true",
                   help="let the server pick the top-k (Triton's classification extension) instead of the client")
    p.add_argument("--workers", type=int, help="threads decoding images (default: one per core, up to 8)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse images with more pixels than this, before decoding (default: {MAX_PIXELS:,})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("bench", help="sweep concurrency and batch size with Locust; table, CSV and plot")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address (default: %(default)s)")
    p.add_argument("--model", default="HRNet_W18_C")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http", help="what Locust sends (statistics use HTTP)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--batch-sizes", default="1,8", help="images per request, comma-separated (default: 1,8)")
    p.add_argument("--concurrency", default="1,2,4,8", help="Locust users, comma-separated (default: 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=20, help="per point (default: 20)")
    p.add_argument("--out", type=Path, default=Path("bench"), help="where bench.csv/.md/.png go (default: bench/)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("preprocess", help="write the float32 NCHW tensor `classify` would send for an image")
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("--out", type=Path, required=True, help="the .npy file to write (shape [1, 3, 224, 224])")
    p.add_argument("--url", help="read the preprocessing parameters from this server's model config")
    p.add_argument("--model", help="with --url: the model's name, e.g. HRNet_W18_C")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"(default: {MAX_PIXELS:,})")
    p.set_defaults(func=_cmd_preprocess)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.INFO, logging.DEBUG)[min(args.verbose, 1)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message="No ccache found")  # printed by `import paddle`, not ours to act on
    for option in ("top_k", "batch_size", "concurrency", "workers", "max_pixels"):
        value = getattr(args, option, None)
        if isinstance(value, int) and value < 1:
            print(f"hrnet-triton: error: --{option.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except HrnetTritonError as err:
        print(f"hrnet-triton: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("hrnet-triton: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hrnet-triton variants | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
