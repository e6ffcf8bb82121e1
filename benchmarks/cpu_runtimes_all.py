"""Every variant served on the cpu target with ONNX Runtime FP32, OpenVINO FP32 and OpenVINO BF16.

For each variant (ONNX models exported beforehand into ``--onnx-dir``, e.g. with offline
weights), one local Triton per runtime serves it as ``hrnet-triton repo --target cpu`` writes
it (``--runtime``, ``--precision``; the target's default arrangement of two one-thread
instances), and ``hrnet_client.TritonClassifier`` sends requests of 1 and of 8 images over HTTP
with ``--concurrency`` in flight. The three runtimes' points are interleaved within each round;
each figure is the median of ``--rounds``, in images/s. BF16 repositories are written without
their parity gate (offline weights fail it: docs/cpu-speed.md) and every answer is checked
against ONNX Runtime in-process (1e-5 at FP32, 0.1 at BF16).

    python benchmarks/cpu_runtimes_all.py --onnx-dir /tmp/all10 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import numpy as np
from serving_throughput import Data, free_ports

from hrnet_build.repository import RepositoryOptions, Target, write_repository
from hrnet_client.triton import TritonClassifier
from hrnet_core import variants
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_triton.perf_report import cpu_model
from hrnet_triton.server import LocalTritonServer, default_serve_env

RUNTIMES = {"ONNX Runtime fp32": ("onnxruntime", "fp32"), "OpenVINO fp32": ("openvino", "fp32")}
RUNTIMES["OpenVINO bf16"] = ("openvino", "bf16")


def rate(clf: TritonClassifier, batches: list[np.ndarray], seconds: float) -> float:
    """Images/s over at least ``seconds`` (and at least one step) of ``run_batches(batches)``."""
    clf.run_batches(batches)  # warm-up
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or not done:
        done += sum(map(len, clf.run_batches(batches)))
    return done / elapsed


def one_variant(name: str, args: argparse.Namespace, data: Data) -> dict[tuple[str, int], float]:
    variant = variants.get(name)
    reference = OnnxRuntimeRunner(args.onnx_dir / f"{name}.onnx").run(data.photos)
    work = args.work / name
    results: dict[tuple[str, int], list[float]] = {}
    with ExitStack() as stack:
        clients = {}
        for label, (runtime, precision) in RUNTIMES.items():
            repo = work / f"repo-{runtime}-{precision}"
            options = RepositoryOptions.for_target(Target.CPU).override(runtime=runtime, precision=precision)
            write_repository(Target.CPU, [variant], repo, options, onnx_dir=args.onnx_dir, kinds=["tensor"], gate=False)
            log = work / f"triton-{runtime}-{precision}.log"
            server = stack.enter_context(
                LocalTritonServer(repo, serve_env=args.serve_env, ports=free_ports(), log_file=log)
            )
            clf = stack.enter_context(
                TritonClassifier(server.http_url, name, input="tensor", concurrency=args.concurrency)
            )
            got = np.concatenate(clf.run_batches([data.photos]))
            assert np.abs(got - reference).max() <= (0.1 if precision == "bf16" else 1e-5), label
            clients[label] = clf
        for r in range(args.rounds):
            for b in (1, 8):
                batches = [data.batch(b, i) for i in range(args.concurrency)]
                for label, clf in clients.items():
                    results.setdefault((label, b), []).append(rate(clf, batches, args.seconds))
                    print(f"{name} round {r + 1}: {label}, batch {b}: {results[label, b][-1]:.2f} img/s", flush=True)
    return {key: statistics.median(v) for key, v in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx-dir", type=Path, required=True, help="where <variant>.onnx files are")
    ap.add_argument("--variants", nargs="+", default=variants.names(), help="default: all ten")
    ap.add_argument("--seconds", type=float, default=10.0, help="per point and round (default: 10)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default: 1)")
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight (default: 2)")
    ap.add_argument("--serve-env", type=Path, default=default_serve_env())
    ap.add_argument("--work", type=Path, default=Path("/tmp/hrnet-cpu-runtimes"), help="repositories and logs")
    args = ap.parse_args()
    data = Data()
    table = {name: one_variant(name, args, data) for name in args.variants}
    print(
        f"\n{date.today()}; {cpu_model()}; HTTP, concurrency {args.concurrency}; median of {args.rounds} round(s) "
        f"of {args.seconds:.0f} s per point; images/s, and the ratio to ONNX Runtime FP32\n"
    )
    heads = [f"{label}, batch {b}" for b in (1, 8) for label in RUNTIMES]
    print("| variant | " + " | ".join(heads) + " |\n|---|" + "---:|" * len(heads))
    for name, res in table.items():
        cells = []
        for b in (1, 8):
            base = res["ONNX Runtime fp32", b]
            cells += [f"{res[label, b]:.1f} ({res[label, b] / base:.2f}×)" for label in RUNTIMES]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
