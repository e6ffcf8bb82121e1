"""Served HRNet throughput over HTTP against the same model in-process, on one machine.

The ways to run one variant (default HRNet_W18_C, offline weights) on the CPU:

- ONNX Runtime, OpenVINO FP32 and OpenVINO BF16 in-process: one runner with as many threads as
  cores, and one single-threaded runner per core run side by side (the server's two-instance
  arrangement, without the server);
- Paddle Inference in-process with oneDNN (PaddleClas's deploy setting), math threads = cores;
- Triton: the ``cpu`` target as ``hrnet-triton repo`` writes it, in each ``--served``
  arrangement (runtime, precision, instances x threads), on the nvidia-pytriton ``tritonserver``,
  called over HTTP by ``hrnet_client.TritonClassifier`` with ``--concurrency`` requests in flight,
  from the same machine (the client's CPU time is part of the bill), sending each ``--inputs``
  kind: ``tensor`` (float32 NCHW, 602 KB an image) and/or ``uint8`` (the 224x224 crops, 150 KB an
  image, normalised inside the model).

Each point runs for ``--seconds`` after a warm-up, on preprocessed copies of the sample
photographs; the points are measured in ``--rounds`` interleaved rounds and each figure is the
median, in images/s. Every path is first checked to give ONNX Runtime's probabilities (within
1e-5 at FP32; within BF16's drift, 0.1, at BF16). The BF16 repositories are written without
their parity gate, which offline weights fail (docs/cpu-speed.md): speed does not depend on it.
The report ends with the goals of docs/cpu-speed.md: served FP32 and BF16 against the best
FP32 in-process runtime, and each served runtime against itself in-process.

    python benchmarks/serving_throughput.py --seconds 20 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from hrnet_build.export import PaddleInferenceRunner, export_onnx
from hrnet_build.repository import RepositoryOptions, Target, write_repository
from hrnet_build.weights import InferenceModel, WeightsSpec, find_inference_model
from hrnet_client.triton import TritonClassifier
from hrnet_core import variants
from hrnet_core.preprocess import load_crop, preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner, OpenVinoRunner, Runner
from hrnet_core.samples import sample_images
from hrnet_triton.perf_report import cpu_model
from hrnet_triton.server import LocalTritonServer, Ports

REPO_ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # every path must give ONNX Runtime's probabilities within this

Point = tuple[str, int]  # (how, images per request)
Steps = dict[Point, Callable[[], int]]  # each step runs some images and says how many


class SideBySideRunner:
    """The server's arrangement in-process: one single-threaded runner per core (``make(threads=1)``),
    run side by side on a thread pool. ``run`` gives each of the ``lanes`` runners a piece of the batch."""

    name = "side by side"

    def __init__(self, make: Callable[..., Runner], lanes: int):
        self.lanes = lanes  # a step gives it `lanes` times the batch size: a full batch per runner
        self.runners = [make(threads=1) for _ in range(lanes)]
        self.pool = ThreadPoolExecutor(lanes)

    def run(self, batch: np.ndarray) -> np.ndarray:
        pieces = [p for p in np.array_split(batch, self.lanes) if len(p)]
        return np.concatenate(list(self.pool.map(lambda r, p: r.run(p), self.runners, pieces)))


@dataclass(frozen=True)
class Models:
    """What the in-process runners are built from."""

    onnx: Path
    paddle: InferenceModel
    cores: int


# The in-process ways to run the model, in table order: (how, runner). A runner with ``lanes``
# runs that many batches at once in each step; the others one.
def _ort(m: Models, threads: int) -> Runner:
    return OnnxRuntimeRunner(m.onnx, threads=threads)


def _ov(precision: str) -> Callable[[Models, int], Runner]:
    return lambda m, threads: OpenVinoRunner(m.onnx, threads=threads, precision=precision)


RUNTIMES = {"ONNX Runtime fp32": _ort, "OpenVINO fp32": _ov("fp32"), "OpenVINO bf16": _ov("bf16")}
IN_PROCESS: list[tuple[str, Callable[[Models], Runner]]] = [
    entry
    for name, make in RUNTIMES.items()
    for entry in (
        (f"{name} in-process", lambda m, make=make: make(m, m.cores)),
        (
            f"{name} in-process, {{cores}} one-thread runners side by side",
            lambda m, make=make: SideBySideRunner(lambda threads: make(m, threads), m.cores),
        ),
    )
] + [
    (
        "Paddle Inference fp32 in-process, oneDNN",
        lambda m: PaddleInferenceRunner(m.paddle, onednn=True, threads=m.cores),
    )
]

# The served arrangements of the cpu target: (runtime, precision, instances, threads per instance).
SERVED = {
    "openvino-fp32-2x1": ("openvino", "fp32", 2, 1),
    "openvino-fp32-1x2": ("openvino", "fp32", 1, 2),
    "openvino-bf16-2x1": ("openvino", "bf16", 2, 1),
    "openvino-bf16-1x2": ("openvino", "bf16", 1, 2),
    "onnxruntime-fp32-2x1": ("onnxruntime", "fp32", 2, 1),
}


# Each in-process runtime's served arrangements start with this.
SERVED_PREFIX = {
    "ONNX Runtime fp32": "onnxruntime-fp32",
    "OpenVINO fp32": "openvino-fp32",
    "OpenVINO bf16": "openvino-bf16",
}


def tolerance(name: str) -> float:
    return 0.1 if "bf16" in name else ATOL


def free_ports() -> Ports:
    """Three free TCP ports on 127.0.0.1 (bound at once, so they differ), for HTTP, gRPC and metrics."""
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        http, grpc, metrics = (s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()
    return Ports(http=http, grpc=grpc, metrics=metrics)


def images_per_second(step: Callable[[], int], seconds: float, warmup: int = 3) -> float:
    """Run ``step`` (which returns how many images it did) for ``seconds``; images/s."""
    for _ in range(warmup):
        step()
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        done += step()
    return done / elapsed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="HRNet_W18_C")
    ap.add_argument("--seconds", type=float, default=20.0, help="per measured point (default: 20)")
    ap.add_argument("--batch-sizes", default="1,8", help="in-process batch sizes, and images per HTTP request")
    ap.add_argument("--concurrency", default="2,4", help="HTTP requests in flight (default: 2,4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the median (default: 3)")
    ap.add_argument("--shared-memory", action="store_true", help="also measure the client with system shared memory")
    ap.add_argument(
        "--served", default=",".join(SERVED), help=f"served arrangements, of: {', '.join(SERVED)} (default: all)"
    )
    ap.add_argument("--inputs", default="tensor", help="input kinds to send: tensor, uint8 (default: tensor)")
    ap.add_argument("--serve-env", type=Path, default=REPO_ROOT / ".venv-serve")
    ap.add_argument("--workdir", type=Path, help="keep the export and repository here (default: a temporary directory)")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.served = args.served.split(",")
    args.inputs = args.inputs.split(",")
    if set(args.inputs) - {"tensor", "uint8"}:
        ap.error(f"--inputs takes tensor and/or uint8, not {args.inputs}")
    unknown = set(args.served) - set(SERVED)
    if unknown:
        ap.error(f"unknown --served {sorted(unknown)}; choose from {', '.join(SERVED)}")
    return args


class Data:
    """Preprocessed sample photographs, and batches of any size drawn from copies of them."""

    def __init__(self) -> None:
        self.photos = preprocess_files(sample_images())
        self.crops = np.stack([load_crop(p) for p in sample_images()])  # the uint8 input of the same photos
        # 14 images of each input kind to draw batches from
        self.pools = {"tensor": np.concatenate([self.photos] * 2), "uint8": np.concatenate([self.crops] * 2)}

    def batch(self, n: int, i: int = 0, kind: str = "tensor") -> np.ndarray:
        return np.ascontiguousarray(np.take(self.pools[kind], range(i, i + n), axis=0, mode="wrap"))


def in_process_steps(models: Models, data: Data, reference: np.ndarray, batch_sizes: list[int]) -> Steps:
    """Every in-process runner at every batch size, each first checked against ``reference``."""
    runners = [(how.format(cores=models.cores), make(models)) for how, make in IN_PROCESS]
    for how, runner in runners:
        np.testing.assert_allclose(runner.run(data.photos), reference, atol=tolerance(how))
    steps: Steps = {}
    for b in batch_sizes:
        for how, runner in runners:
            x = data.batch(b * getattr(runner, "lanes", 1))
            steps[how, b] = lambda runner=runner, x=x: len(runner.run(x))
    return steps


def triton_steps(
    clients: ExitStack, url: str, label: str, model: str, data: Data, reference: np.ndarray, b: int, args
) -> Steps:
    """``b`` images per request over HTTP of each ``--inputs`` kind at every ``--concurrency`` (and
    with shared memory, if asked)."""
    steps: Steps = {}
    for kind, c in ((kind, c) for kind in args.inputs for c in args.concurrencies):
        first = data.photos if kind == "tensor" else data.crops
        for shm in (False, True) if args.shared_memory else (False,):
            clf = clients.enter_context(TritonClassifier(url, model, input=kind, concurrency=c, shared_memory=shm))
            got = np.concatenate(clf.run_batches([first[i : i + b] for i in range(0, len(first), b)]))
            np.testing.assert_allclose(got, reference, atol=tolerance(label))
            batches = [data.batch(b, i, kind) for i in range(c * 2)]  # two rounds of c requests per step
            how = f"{kind} input, " if kind != "tensor" else ""
            name = f"Triton {label} over HTTP, {how}{'shared memory, ' if shm else ''}concurrency {c}"
            steps[name, b] = lambda clf=clf, batches=batches: sum(map(len, clf.run_batches(batches)))
    return steps


def measure(steps: Steps, rounds: int, seconds: float) -> dict[Point, list[float]]:
    # Rounds interleave every point, so a slow spell of the machine hits them all alike.
    results: dict[Point, list[float]] = {key: [] for key in steps}
    for r in range(rounds):
        for key, step in steps.items():
            results[key].append(images_per_second(step, seconds, warmup=1 if r else 3))
            print(f"round {r + 1}: {key[0]}, {key[1]} per request: {results[key][-1]:.2f} img/s", flush=True)
    return results


def report(variant: str, rows: list[tuple[str, int, float]], args: argparse.Namespace, cores: int) -> None:
    import onnxruntime as ort
    import openvino as ov
    from paddle import inference

    print(
        f"\n{variant}, offline weights; {date.today()}; {cpu_model()}, {cores} cores; "
        f"median of {args.rounds} rounds of {args.seconds:.0f} s per point; onnxruntime {ort.__version__}; "
        f"openvino {ov.__version__.split('-')[0]}; "
        f"{inference.get_version().splitlines()[0] if hasattr(inference, 'get_version') else ''}\n"
    )
    print("| how | images per request | images/s |\n|---|---:|---:|")
    for name, b, r in rows:
        print(f"| {name} | {b} | {r:.1f} |")
    goals(rows)


def best_of(rows: list[tuple[str, int, float]], prefix: str, kind: str = "tensor") -> float:
    """The best median of the rows whose name starts with ``prefix``; of served rows, those of the ``kind`` input."""
    found = [r for n, _, r in rows if n.startswith(prefix) and (("uint8 input" in n) == (kind == "uint8"))]
    return max(found) if found else float("nan")


def goals(rows: list[tuple[str, int, float]]) -> None:
    """docs/cpu-speed.md's goals, from this run's medians, for each input kind sent."""
    fp32 = max(best_of(rows, "ONNX Runtime fp32 in-process"), best_of(rows, "Paddle Inference fp32"))
    print(f"\nbest FP32 in-process (ONNX Runtime or Paddle Inference, as the goals define it): {fp32:.1f} img/s")
    for kind in ("tensor", "uint8"):
        for runtime in RUNTIMES:
            served = best_of(rows, f"Triton {SERVED_PREFIX[runtime]}", kind)
            if served != served:  # NaN: not served with this input in this run
                continue
            alone = best_of(rows, f"{runtime} in-process")
            print(
                f"served {runtime}, {kind} input: {served:.1f} img/s = {served / fp32:.2f}x the best FP32 "
                f"in-process; {served / alone:.2f}x {runtime} in-process ({alone:.1f})"
            )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    variant = variants.get(args.variant)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hrnet-bench-"))
    onnx, paddle_dir = work / f"{variant.name}.onnx", work / "paddle"
    if not onnx.is_file() or not paddle_dir.is_dir():
        export_onnx(variant, WeightsSpec.parse("offline"), onnx, paddle_model_dir=paddle_dir, progress=False)
    data = Data()
    reference = OnnxRuntimeRunner(onnx, threads=cores).run(data.photos)
    in_process = in_process_steps(
        Models(onnx, find_inference_model(paddle_dir), cores), data, reference, args.batch_sizes
    )

    with ExitStack() as stack:
        servers = {label: stack.enter_context(serve(variant, work, label, args)) for label in args.served}
        steps: Steps = {}
        for b in args.batch_sizes:  # table order: each batch size's in-process points, then its served ones
            steps.update({key: step for key, step in in_process.items() if key[1] == b})
            for label, server in servers.items():
                steps.update(triton_steps(stack, server.http_url, label, variant.name, data, reference, b, args))
        results = measure(steps, args.rounds, args.seconds)
    rows = [(name, b, statistics.median(v)) for (name, b), v in results.items()]
    report(variant.name, rows, args, cores)


def serve(variant, work: Path, label: str, args: argparse.Namespace) -> LocalTritonServer:
    """A server of its own for the ``label`` arrangement of the cpu target (one model name each)."""
    runtime, precision, instances, threads = SERVED[label]
    options = RepositoryOptions.for_target(Target.CPU).override(
        runtime=runtime, precision=precision, instances=instances, threads=threads
    )
    repo = work / f"repository-{label}"
    write_repository(Target.CPU, [variant], repo, options, onnx_dir=work, kinds=args.inputs, gate=precision == "fp32")
    return LocalTritonServer(repo, serve_env=args.serve_env, ports=free_ports(), log_file=work / f"triton-{label}.log")


if __name__ == "__main__":
    main()
