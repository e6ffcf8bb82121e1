"""hrnet-triton: serve the PaddleClas HRNet classifiers on NVIDIA Triton Inference Server.

Each subcommand parses its options, calls one typed function of a stage or an entry point, and
prints the result: the work itself lives in ``hrnet_build`` (export, engine, repo), ``hrnet_client``
(classify, preprocess) and this package's ``server``, ``demo`` and ``bench``. Errors of the
project's family are printed as one message, with their exit code and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from hrnet_core import __version__, variants
from hrnet_core.errors import HrnetTritonError

log = logging.getLogger("hrnet_triton")


# -- commands: call one function, print its result ----------------------------------------------


def _cmd_variants(args: argparse.Namespace) -> int:
    rows = variants.VARIANTS
    if args.json:
        urls = [{"pretrained_url": v.pretrained_url, "inference_url": v.inference_url} for v in rows]
        print(json.dumps([{**v.__dict__, "flavour": v.flavour.value, **u} for v, u in zip(rows, urls)], indent=2))
        return 0

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    print(
        f"{'model':<20} {'width':>5} {'SE':>3} {'weights':<8} {'top1':>6} {'top5':>6} {'ref1':>6} {'ref5':>6} "
        f"{'GFLOPs':>7} {'Mparams':>8}"
    )
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
    from hrnet_build.export import export_onnx
    from hrnet_build.onnx_graph import uint8_path
    from hrnet_build.weights import WeightsSpec
    from hrnet_core.manifest import ExportManifest, manifest_path

    variant = variants.get(args.variant)
    m = export_onnx(
        variant,
        WeightsSpec.parse(args.weights, allow_unpinned=args.allow_unpinned_weights),
        args.out,
        paddle_model_dir=args.paddle_model_dir,
        cache=args.cache_dir,
        progress=not args.no_progress,
    )
    print(
        f"{variant.name}: wrote {args.out} ({m.onnx_bytes / 1e6:.1f} MB) and {manifest_path(args.out)}\n"
        f"  input {m.input.name} {list(m.input.dims)} {m.input.dtype} -> "
        f"output {m.output.name} {list(m.output.dims)} {m.output.dtype}\n"
        f"  parity: {m.parity.summary()}; "
        f"top-1 probability {m.parity.min_top1_prob:.3f}..{m.parity.max_top1_prob:.3f}\n"
        f"  {m.export_seconds:.0f} s, peak RSS {m.peak_rss_mib:.0f} MiB"
    )
    u8_path = uint8_path(args.out)
    u8 = ExportManifest.read(u8_path)
    print(
        f"  and {u8_path} (+ .json): input {u8.input.name} {list(u8.input.dims)} {u8.input.dtype}, "
        f"normalised in the model's first nodes\n  parity: {u8.parity.summary()}"
    )
    if not m.weights["labels_meaningful"]:
        print("  NOTE: offline weights: the model's labels are meaningless.")
    return 0


def _cmd_engine(args: argparse.Namespace) -> int:
    from hrnet_build.engine import Precision, engine

    result = engine(
        variants.get(args.variant),
        args.onnx,
        args.out,
        plans_dir=args.plans_dir,
        precision=Precision(args.precision),
        max_batch=args.max_batch,
        timing_cache=args.timing_cache,
        skip_if_current=args.skip_if_current,
    )
    m = result.manifest
    if not result.built:
        print(
            f"{args.variant}: {result.path} is {result.reason} "
            f"(cc {m.compute_capability}, TensorRT {m.tensorrt_version}): skipped"
        )
        return 0
    print(
        f"{m.variant}: {m.precision} plan for {m.gpu_name} (cc {m.compute_capability}), TensorRT {m.tensorrt_version}, "
        f"profile {m.profile.min}/{m.profile.opt}/{m.profile.max} -> {result.path} ({result.reason})\n"
        f"  parity: {m.parity.summary()}"
    )
    return 0


def _cmd_repo(args: argparse.Namespace) -> int:
    from hrnet_build.repository import RepositoryOptions, Target, write_repository

    target = Target(args.target)
    gpu = target is Target.GPU
    if gpu and (args.runtime or args.precision == "bf16"):
        raise HrnetTritonError("gpu target: TensorRT plans; --runtime and bf16 are for the cpu and onnx targets")
    if not gpu and args.precision == "fp16":
        raise HrnetTritonError("fp16 is the gpu target's; the cpu and onnx targets run at fp32 or bf16")
    options = RepositoryOptions.for_target(target).override(
        max_batch=args.max_batch,
        instances=args.instances,
        max_queue_size=args.max_queue_size,
        threads=args.threads,
        instance_kind=args.instance_kind,
        runtime=args.runtime,
        precision=None if gpu else args.precision,
    )
    if target is not Target.GPU and args.onnx_dir is None:
        log.warning("no --onnx-dir: writing configs and labels only; put each model.onnx in <model>/1/ yourself")
    chosen = [variants.get(n) for n in (args.variants or variants.names())]
    written = write_repository(
        target,
        chosen,
        args.out,
        options,
        onnx_dir=args.onnx_dir,
        plans_dir=args.plans_dir,
        fit_to_plans=args.max_batch is None,
        precision=args.precision or "fp16",
        kinds=args.inputs,
    )
    print(f"wrote {len(written)} {target.value}-target model(s) to {args.out}: {', '.join(p.name for p in written)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from hrnet_triton.server import LocalTritonServer, admin_key_notice, default_serve_env, sigterm_as_interrupt

    sigterm_as_interrupt()
    server = LocalTritonServer(
        args.repo,
        serve_env=args.serve_env or default_serve_env(),
        ports=_ports(args),
        forward_log=True,
        host=args.host,
        admin_key=args.admin_key,
    )
    try:
        server.start()
        notice = admin_key_notice(server)
        if notice:
            print(notice, file=sys.stderr, flush=True)
        p, where = server.ports, server.connect_host
        print(
            f"Triton is serving {args.repo}, listening on {args.host}: HTTP {server.http_url}, gRPC {where}:{p.grpc}, "
            f"metrics http://{where}:{p.metrics}/metrics. Ctrl-C stops it.",
            flush=True,
        )
        server.wait()  # returns only by raising: tritonserver ended by itself
    except KeyboardInterrupt:
        print("stopping Triton", file=sys.stderr)
        return 0
    finally:
        server.stop()


def _cmd_demo(args: argparse.Namespace) -> int:
    from hrnet_triton import demo
    from hrnet_triton.server import default_serve_env

    return demo.run(
        args.variant,
        args.out,
        ports=_ports(args),
        serve_env=args.serve_env or default_serve_env(),
        host=args.host,
        admin_key=args.admin_key,
        top_k=args.top_k,
        keep_serving=args.keep_serving,
        progress=not args.no_progress,
    )


def _cmd_classify(args: argparse.Namespace) -> int:
    import contextlib
    import itertools

    from hrnet_client.classify import RunnerClassifier, read_paths, write_predictions
    from hrnet_core.runtime import OnnxRuntimeRunner
    from hrnet_core.samples import sample_images

    if not (args.images or args.samples or args.files_from):
        raise HrnetTritonError(
            "no images given: name image files, list them with --files-from, "
            "or pass --samples for the bundled photographs"
        )
    if (args.onnx is None) == (args.url is None):
        raise HrnetTritonError("give either --url (a Triton server) with --model, or --onnx (in-process)")
    if args.onnx is not None:
        if args.shared_memory or args.server_top_k or args.concurrency != 1 or args.input:
            raise HrnetTritonError(
                "--shared-memory, --server-top-k, --concurrency and --input need a server (--url), not --onnx "
                "(an ONNX model's own input decides what it takes)"
            )
        classifier = RunnerClassifier(OnnxRuntimeRunner(args.onnx))
    else:
        classifier = _triton_classifier(
            args,
            input=args.input,
            concurrency=args.concurrency,
            shared_memory=args.shared_memory,
            server_top_k=args.server_top_k,
            retry_s=args.retry_seconds,
            admin_key=args.admin_key,
            grpc_round_robin=args.grpc_round_robin,
        )
        log.info(
            "classifying with %s on %s; input: %s", classifier.model, classifier.address, classifier.input.describe()
        )
    listed = read_paths(args.files_from) if args.files_from else ()
    images = itertools.chain(args.images, listed, sample_images() if args.samples else ())
    options = {"workers": args.workers, "max_pixels": args.max_pixels, "max_bytes": args.max_bytes}
    with classifier, contextlib.closing(classifier.iter_files(images, args.top_k, args.batch_size, **options)) as preds:
        written, failed = write_predictions(preds, sys.stdout, as_json=args.json)
    if failed:
        log.error("%d of %d images could not be classified", failed, written)
        return 2
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from hrnet_client.inputs import save_input
    from hrnet_core.contract import DEFAULT_PREPROCESS

    cfg, source = DEFAULT_PREPROCESS, "PaddleClas's inference_cls.yaml"
    if args.url:
        with _triton_classifier(args, input=args.input) as classifier:
            cfg, source = classifier.cfg, f"{classifier.model}'s config on {classifier.address}"
    out, x = save_input(args.image, args.out, args.input, cfg, args.max_pixels)
    layout = "NCHW" if args.input == "tensor" else "NHWC, RGB"
    print(f"{args.image} -> {out}: {x.dtype} {list(x.shape)} ({layout}), parameters from {source}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from hrnet_triton.perf_options import bench_config
    from hrnet_triton.perf_report import bench_and_write

    written = bench_and_write(bench_config(args), args.out, args.slo_ms)
    print((args.out / "bench.md").read_text())
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from hrnet_triton.tune import run_from_args

    result = run_from_args(args)
    if result.winner is None:
        print(f"wrote Model Analyzer's config and base repository to {result.report}; nothing was run (--config-only)")
        return 0
    w, row = result.winner, result.winner.row
    print(
        f"winner {w.variant_name}: {w.options.instances} instance(s), max batch {w.options.max_batch_size}, "
        f"queue delay {w.options.max_queue_delay_us} us: {row['Throughput (infer/sec)']} infer/s, "
        f"p95 {row['p95 Latency (ms)']} ms at concurrency {row['Concurrency']}\n"
        f"wrote {', '.join(str(p) for p in result.written)}; Model Analyzer's report: {result.report}"
    )
    return 0


def _triton_classifier(args: argparse.Namespace, **options):
    from hrnet_client.triton import TritonClassifier

    if not args.model:
        raise HrnetTritonError("--url needs --model, one of the seed names (`hrnet-triton variants`)")
    return TritonClassifier(args.url, args.model, args.protocol, **options)


def _ports(args: argparse.Namespace):
    from hrnet_triton.server import Ports

    return Ports(args.http_port, args.grpc_port, args.metrics_port)


# -- the parser ---------------------------------------------------------------------------------

COMMANDS = {
    "variants": _cmd_variants,
    "export": _cmd_export,
    "engine": _cmd_engine,
    "repo": _cmd_repo,
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "classify": _cmd_classify,
    "preprocess": _cmd_preprocess,
    "bench": _cmd_bench,
    "tune": _cmd_tune,
}


def build_parser() -> argparse.ArgumentParser:
    from hrnet_triton.parsers import build_parser as build

    return build(__doc__.split("\n\n")[0].removeprefix("hrnet-triton: "), __version__, COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.INFO, logging.DEBUG)[min(args.verbose, 1)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", message="No ccache found")  # printed by `import paddle`, not ours to act on
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
