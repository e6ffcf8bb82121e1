"""The report of the GPU path's first real run (``build/gpu_first_run.sh``): one verdict from four checks.

1. The TensorRT the container really has (``dpkg -l | grep nvinfer`` and ``tensorrt.__version__``,
   captured by the script) against the pinned release.
2. The plan's own parity gate, from its manifest (``X.plan.json``).
3. The served answers: the sample photographs through the running Triton, over HTTP and gRPC,
   against ONNX Runtime in-process on the exported model, with the plan precision's limits.
4. Throughput and p99 from ``hrnet-triton bench``'s CSV.

    python -m hrnet_triton.gpu_check --url 127.0.0.1:8000 --grpc-port 8001 --onnx W18.onnx \\
        --plans artifacts/plans --tensorrt-info artifacts/tensorrt.txt --bench artifacts/bench/bench.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from hrnet_build.engine import PARITY, Precision
from hrnet_client.served_model import Protocol, address
from hrnet_client.triton import TritonClassifier
from hrnet_core import release
from hrnet_core.errors import HrnetTritonError
from hrnet_core.manifest import PlanManifest
from hrnet_core.parity import compare
from hrnet_core.preprocess import preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images


def tensorrt_check(info: Path | None) -> tuple[bool, str]:
    """The container's TensorRT, from the lines the script captured, against the pin."""
    if info is None or not info.is_file():
        return False, "TensorRT in the container: not captured (no --tensorrt-info)"
    lines = info.read_text().splitlines()
    packages = [ln.split()[1:3] for ln in lines if ln.startswith("ii") and "nvinfer" in ln]
    python = next((ln.split("=", 1)[1].strip() for ln in lines if ln.startswith("tensorrt.__version__=")), "?")
    versions = sorted({v for _, v in packages})
    ok = python == release.TENSORRT_PYTHON_VERSION and any(v.startswith(release.TENSORRT_VERSION) for v in versions)
    return ok, (
        f"TensorRT in the container: dpkg {', '.join(versions) or 'no nvinfer package'}; tensorrt.__version__ "
        f"{python}; pinned {release.TENSORRT_VERSION} (Python {release.TENSORRT_PYTHON_VERSION})"
    )


def plan_checks(plans: Path | None, model: str) -> tuple[bool, list[str], Precision]:
    manifests = sorted(plans.glob(f"{model}.*.plan.json")) if plans else []
    if not manifests:
        return False, [f"plan: no {model} plan manifest in {plans}"], Precision.FP16
    lines, ok = [], True
    for path in manifests:
        m = PlanManifest.read(path)
        ok = ok and m.parity.passed
        lines.append(f"plan {m.plan_file}: {m.gpu_name} (cc {m.compute_capability}), TensorRT {m.tensorrt_version}")
        lines.append(f"  its gate: {m.parity.summary()}")
    return ok, lines, Precision(PlanManifest.read(manifests[-1]).precision)


def served_checks(url: str, grpc_port: int, model: str, onnx: Path, precision: Precision) -> tuple[bool, list[str]]:
    """The photographs through the server, both protocols, against ONNX Runtime in-process."""
    photos = sample_images()
    batch = preprocess_files(photos)
    reference = OnnxRuntimeRunner(onnx).run(batch)
    ok, lines = True, []
    for protocol in Protocol:
        where = address(url, protocol, grpc_port)
        with TritonClassifier(where, model, protocol, input="tensor") as served:
            report = compare(
                reference, served.run(batch), PARITY[precision], images=[p.name for p in photos],
                reference_name="ONNX Runtime", candidate_name=f"Triton {protocol.value.upper()}",
            )  # fmt: skip
        ok = ok and report.passed
        lines.append(f"served: {report.summary()}{'' if report.passed else ' FAILED'}")
    return ok, lines


def bench_summary(csv_path: Path | None) -> list[str]:
    if csv_path is None or not csv_path.is_file():
        return ["throughput: not measured (no --bench CSV)"]
    with open(csv_path, newline="") as fh:  # closed-loop rows that were measured (bench.md: a row per tool and point)
        rows = [r for r in csv.DictReader(fh) if r["images_per_s"] and r.get("mode", "concurrency") == "concurrency"]
    if not rows:
        return [f"throughput: no measured point in {csv_path}"]
    best = max(rows, key=lambda r: float(r["images_per_s"]))
    return [
        f"throughput: best {float(best['images_per_s']):.1f} images/s at batch {best['batch_size']}, concurrency "
        f"{best['concurrency']} ({best.get('tool', 'locust')}); p99 there {float(best['p99_ms']):.1f} ms; failures "
        f"{sum(int(r['failures'] or 0) for r in rows)} of {sum(int(r['requests'] or 0) for r in rows)} requests"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hrnet_triton.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address (default: %(default)s)")
    ap.add_argument("--grpc-port", type=int, default=8001, help="the server's gRPC port (default: %(default)s)")
    ap.add_argument("--model", default="HRNet_W18_C", help="the served model (default: %(default)s)")
    ap.add_argument("--onnx", type=Path, required=True, help="the exported ONNX model the plan was built from")
    ap.add_argument("--plans", type=Path, help="the directory of plans and their .plan.json manifests")
    ap.add_argument(
        "--tensorrt-info", type=Path, help="dpkg -l | grep nvinfer, and tensorrt.__version__=X, from the container"
    )
    ap.add_argument("--bench", type=Path, help="bench.csv from `hrnet-triton bench`")
    args = ap.parse_args(argv)
    try:
        trt_ok, trt_line = tensorrt_check(args.tensorrt_info)
        plan_ok, plan_lines, precision = plan_checks(args.plans, args.model)
        served_ok, served_lines = served_checks(args.url, args.grpc_port, args.model, args.onnx, precision)
    except HrnetTritonError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 1
    verdict = "PASS" if trt_ok and plan_ok and served_ok else "FAIL"
    print("\n".join([f"== {args.model}: the GPU path's first run ==", trt_line, *plan_lines, *served_lines,
                     *bench_summary(args.bench), f"verdict: {verdict}"]))  # fmt: skip
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
