"""A soak at twice the saturating concurrency: are all answers right, every rejection explicit,
and does the server's memory stay flat?

Serves HRNet_W18_C (cpu target, offline weights) on a local Triton with a small queue
(``--max-queue-size``), then keeps ``--concurrency`` requests in flight for ``--minutes``
through the project's client, with retries off so that every rejection reaches the caller.
Each answer is compared with ONNX Runtime in-process on the same images (|Δprob| <= 1e-5):
a wrong answer is counted, never hidden. Prints accepted and rejected counts (by reason),
goodput, p50/p99 of accepted requests, and the RSS of tritonserver and its stubs at the
start and at the end.

    python benchmarks/soak.py --minutes 10 --concurrency 8 --max-queue-size 4
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from fault_matrix import free_ports  # the benchmark beside this one

from hrnet_build.export import export_onnx
from hrnet_build.repository import RepositoryOptions, Target, write_repository
from hrnet_build.weights import WeightsSpec
from hrnet_client.triton import TritonClassifier
from hrnet_core import variants
from hrnet_core.errors import HrnetTritonError
from hrnet_core.preprocess import preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_triton.server import LocalTritonServer, default_serve_env


def server_rss_mib(pid: int) -> float:
    """RSS of tritonserver and every process of its group (the python-backend stubs)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pid:  # process group id
                total += int((status.parent / "statm").read_text().split()[1]) * 4096
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def soak(url: str, batch: np.ndarray, expected: np.ndarray, concurrency: int, seconds: float) -> dict:
    lock = threading.Lock()
    latencies: list[float] = []
    rejected: collections.Counter[str] = collections.Counter()
    wrong = 0
    deadline = time.monotonic() + seconds

    def user() -> None:
        nonlocal wrong
        with TritonClassifier(url, "HRNet_W18_C", input="tensor", retry_s=0) as client:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    probs = client.run(batch)
                except HrnetTritonError as err:
                    with lock:
                        rejected[f"{type(err).__name__}: {str(err)[:90]}"] += 1
                    time.sleep(0.05)
                    continue
                elapsed = time.perf_counter() - start
                ok = probs.shape == expected.shape and float(np.abs(probs - expected).max()) <= 1e-5
                with lock:
                    latencies.append(elapsed)
                    wrong += 0 if ok else 1

    threads = [threading.Thread(target=user) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "rejected": rejected, "wrong": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8: 2x the 4 that saturate)")
    ap.add_argument("--max-queue-size", type=int, default=4, help="the model's queue (default 4)")
    ap.add_argument("--onnx", type=Path, help="an exported HRNet_W18_C.onnx (default: export offline weights)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hrnet-soak-"))
    onnx = args.onnx
    if onnx is None:
        onnx = work / "HRNet_W18_C.onnx"
        export_onnx(variants.get("HRNet_W18_C"), WeightsSpec.parse("offline"), onnx, progress=False)
    options = RepositoryOptions.for_target(Target.CPU).override(max_queue_size=args.max_queue_size)
    write_repository(Target.CPU, [variants.get("HRNet_W18_C")], work / "repo", options, onnx_dir=onnx.parent)
    batch = preprocess_files(sample_images()[:1])
    expected = OnnxRuntimeRunner(onnx).run(batch)
    server = LocalTritonServer(
        work / "repo", serve_env=default_serve_env(), ports=free_ports(), log_file=work / "t.log"
    )
    with server as srv:
        pid = srv.process.pid
        start_rss = server_rss_mib(pid)
        result = soak(srv.http_url, batch, expected, args.concurrency, args.minutes * 60)
        end_rss = server_rss_mib(pid)
    lat = sorted(result["latencies"])
    print(
        f"{time.strftime('%Y-%m-%d')}, {args.minutes:g} min, concurrency {args.concurrency}, batch 1, "
        f"queue {args.max_queue_size}, HRNet_W18_C cpu target (offline weights)"
    )
    print(f"accepted {len(lat)}, wrong answers {result['wrong']}, goodput {len(lat) / (args.minutes * 60):.2f} img/s")
    p99 = lat[int(0.99 * (len(lat) - 1))]
    print(f"accepted latency p50 {statistics.median(lat) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
    print(f"rejected {sum(result['rejected'].values())}:")
    for reason, n in result["rejected"].most_common():
        print(f"  {n:6d}  {reason}")
    print(f"server RSS (tritonserver + stubs): start {start_rss:.0f} MiB, end {end_rss:.0f} MiB")


if __name__ == "__main__":
    main()
