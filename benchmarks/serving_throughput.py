"""Served HRNet throughput over HTTP against the same model in-process, on one machine.

Three ways to run one variant (default HRNet_W18_C, offline weights) on the CPU:

- ONNX Runtime in-process: one session with ``intra_op_num_threads`` = cores, and one
  single-threaded session per core run side by side (the server's arrangement, without it);
- Paddle Inference in-process with oneDNN (PaddleClas's deploy setting), math threads = cores;
- Triton: the ``cpu`` target as ``hrnet-triton repo`` writes it (two instances of one ORT thread
  each) on the nvidia-pytriton ``tritonserver``, called over HTTP by ``hrnet_client.TritonClassifier`` with ``--concurrency``
  requests in flight, from the same machine (the client's CPU time is part of the bill).

Each point runs for ``--seconds`` after a warm-up, on preprocessed copies of the sample
photographs; the points are measured in ``--rounds`` interleaved rounds and each figure is the
median, in images/s. The "best served" line uses plain HTTP (no shared memory). Every path is first checked to give ONNX Runtime's
probabilities (within 1e-5), so all three compute the same answer.

    python benchmarks/serving_throughput.py --seconds 20 --rounds 3 --shared-memory
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def images_per_second(step: Callable[[], int], seconds: float, warmup: int = 3) -> float:
    """Run ``step`` (which returns how many images it did) for ``seconds``; images/s."""
    for _ in range(warmup):
        step()
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        done += step()
    return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="HRNet_W18_C")
    ap.add_argument("--seconds", type=float, default=20.0, help="per measured point (default: 20)")
    ap.add_argument("--batch-sizes", default="1,8", help="in-process batch sizes, and images per HTTP request")
    ap.add_argument("--concurrency", default="2,4", help="HTTP requests in flight (default: 2,4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the median (default: 3)")
    ap.add_argument("--shared-memory", action="store_true", help="also measure the client with system shared memory")
    ap.add_argument("--serve-env", type=Path, default=REPO_ROOT / ".venv-serve")
    ap.add_argument("--workdir", type=Path, help="keep the export and repository here (default: a temporary directory)")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    threads = os.cpu_count() or 1

    import onnxruntime as ort
    from paddle import inference

    from hrnet_build import weights
    from hrnet_build.export import export_onnx
    from hrnet_build.repository import Target, write_repository
    from hrnet_client.preprocess import preprocess_files
    from hrnet_client.samples import sample_images
    from hrnet_client.triton import TritonClassifier
    from hrnet_triton import variants
    from hrnet_triton.contract import INPUT_NAME, OUTPUT_NAME
    from hrnet_triton.server import LocalTritonServer
    from test_repository import _free_ports

    variant = variants.get(args.variant)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hrnet-bench-"))
    onnx, paddle_dir = work / f"{variant.name}.onnx", work / "paddle"
    if not onnx.is_file() or not paddle_dir.is_dir():
        export_onnx(variant, weights.WeightsSpec.parse("offline"), onnx, paddle_model_dir=paddle_dir, progress=False)
    photos = preprocess_files(sample_images())
    data = np.concatenate([photos] * 2)  # 14 images to draw batches from

    def batch_of(n: int, i: int = 0) -> np.ndarray:
        return np.ascontiguousarray(np.take(data, range(i, i + n), axis=0, mode="wrap"))

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    reference = session.run([OUTPUT_NAME], {INPUT_NAME: photos})[0]
    # The server's own arrangement, in-process: one single-threaded session per core, run side by side.
    single = ort.SessionOptions()
    single.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(onnx), single, providers=["CPUExecutionProvider"]) for _ in range(threads)]
    pool = ThreadPoolExecutor(threads)

    def side_by_side(x: np.ndarray) -> int:
        return sum(pool.map(lambda s: len(s.run([OUTPUT_NAME], {INPUT_NAME: x})[0]), sessions))

    model = weights.find_inference_model(paddle_dir)
    config = inference.Config(str(model.graph), str(model.params))
    config.disable_gpu()
    config.disable_glog_info()
    config.switch_ir_optim(True)
    config.enable_mkldnn()
    config.set_cpu_math_library_num_threads(threads)
    predictor = inference.create_predictor(config)
    pin = predictor.get_input_handle(predictor.get_input_names()[0])
    pout = predictor.get_output_handle(predictor.get_output_names()[0])

    def paddle_run(x: np.ndarray) -> np.ndarray:
        pin.reshape(list(x.shape))
        pin.copy_from_cpu(x)
        predictor.run()
        return pout.copy_to_cpu()

    np.testing.assert_allclose(paddle_run(photos), reference, atol=1e-5)

    write_repository(Target.CPU, [variant], work / "repository", onnx_dir=work)
    server = LocalTritonServer(work / "repository", serve_env=args.serve_env, ports=_free_ports(), log_file=work / "triton.log")
    points: dict[tuple[str, int], Callable[[], int]] = {}
    clients = []
    with server:
        for b in batch_sizes:
            x = batch_of(b)
            points["ONNX Runtime in-process", b] = lambda x=x: len(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
            points[f"ONNX Runtime in-process, {threads} one-thread sessions side by side", b] = lambda x=x: side_by_side(x)
            points["Paddle Inference in-process, oneDNN", b] = lambda x=x: len(paddle_run(x))
            for c in concurrencies:
                for shm in (False, True) if args.shared_memory else (False,):
                    clf = TritonClassifier(server.http_url, variant.name, concurrency=c, shared_memory=shm)
                    clients.append(clf)
                    got = np.concatenate(clf.run_batches([photos[i : i + b] for i in range(0, len(photos), b)]))
                    np.testing.assert_allclose(got, reference, atol=1e-5)
                    batches = [batch_of(b, i) for i in range(c * 2)]  # two rounds of c requests per step
                    name = f"Triton over HTTP{' + shared memory' if shm else ''}, concurrency {c}"
                    points[name, b] = lambda clf=clf, batches=batches: sum(map(len, clf.run_batches(batches)))
        # Rounds interleave every point, so a slow spell of the machine hits them all alike.
        results: dict[tuple[str, int], list[float]] = {key: [] for key in points}
        for r in range(args.rounds):
            for key, step in points.items():
                results[key].append(images_per_second(step, args.seconds, warmup=1 if r else 3))
                print(f"round {r + 1}: {key[0]}, {key[1]} per request: {results[key][-1]:.2f} img/s", flush=True)
        for clf in clients:
            clf.close()
    rows = [(name, b, statistics.median(v)) for (name, b), v in results.items()]

    print(f"\n{variant.name}, offline weights; {date.today()}; {cpu_name()}, {threads} cores; median of {args.rounds} rounds of {args.seconds:.0f} s per point; "
          f"onnxruntime {ort.__version__}; {inference.get_version().splitlines()[0] if hasattr(inference, 'get_version') else ''}\n")  # fmt: skip
    print("| how | images per request | images/s |\n|---|---:|---:|")
    for name, b, r in rows:
        print(f"| {name} | {b} | {r:.1f} |")
    def best_of(prefix: str) -> float:
        return max(r for n, _, r in rows if n.startswith(prefix))

    best = {"ONNX Runtime": best_of("ONNX Runtime in-process"), "Paddle Inference": best_of("Paddle Inference"),
            "Triton": best_of("Triton over HTTP,")}  # fmt: skip
    print(f"\nbest served {best['Triton']:.1f} img/s = {best['Triton'] / best['ONNX Runtime']:.2f}x ONNX Runtime's best "
          f"({best['ONNX Runtime']:.1f}), {best['Triton'] / best['Paddle Inference']:.2f}x Paddle Inference's best "
          f"({best['Paddle Inference']:.1f}); ONNX Runtime's best counts its side-by-side sessions too")  # fmt: skip


if __name__ == "__main__":
    main()
