"""How much memory serving the variants takes on the CPU: the figure a pod's memory limit rests on.

Two measurements, on ONNX models already exported into ``--onnx-dir`` (``X.onnx`` and its
``X_uint8.onnx``, as ``hrnet-triton export`` writes them):

- ``served``: the ``cpu`` target as ``hrnet-triton repo`` writes it (OpenVINO FP32 through
  Triton's python backend, one stub process per model instance), on the local
  ``tritonserver``. Memory is the sum over the server and its stub processes of the
  proportional set size (PSS: a page shared by n processes counts 1/n to each), read once
  every model is loaded and again after one request of ``--batch`` images to each model
  (activations); and the sum of each process's peak resident size (VmHWM), an upper bound.
- ``one-process``: every model compiled by OpenVINO in this one process and one batch of
  ``--batch`` images run through it (as Triton's warm-up does at load), model after model, all
  kept: the arrangement of Triton's openvino backend (the onnx target of the cpu overlay), where
  model instances are threads of the one server process. Resident size (RSS) after each compile
  and after each batch (OpenVINO keeps the memory of the largest batch it ran), and the peak.

    python benchmarks/serving_memory.py --onnx-dir DIR --how one-process --batch 16 --inputs tensor,uint8
    python benchmarks/serving_memory.py --onnx-dir DIR --how served --batch 8

Memory is read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import gc
import socket
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hrnet_core import variants
from hrnet_triton.perf_report import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def status_bytes(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise KeyError("Pss")


def model_files(onnx_dir: Path, names: list[str], inputs: list[str]) -> list[tuple[str, Path]]:
    files = []
    for name in names:
        for kind in inputs:
            path = onnx_dir / (f"{name}.onnx" if kind == "tensor" else f"{name}_uint8.onnx")
            if not path.is_file():
                raise SystemExit(f"{path} is missing: export it with `hrnet-triton export {name} --out ...`")
            files.append((kind, path))
    return files


def zeros(kind: str, batch: int) -> np.ndarray:
    return np.zeros((batch, 224, 224, 3), np.uint8) if kind == "uint8" else np.zeros((batch, 3, 224, 224), np.float32)


def one_process(files: list[tuple[str, Path]], batch: int, threads: int) -> list[tuple[str, float]]:
    """Compile each model here and run one batch through it, one model after another, keeping them
    all (as a server does after its warm-up); (what, GiB resident) rows."""
    from hrnet_core.runtime import OpenVinoRunner

    rows = [("this process before any model", status_bytes("self", "VmRSS") / GIB)]
    runners = []
    for kind, path in files:
        runners.append(OpenVinoRunner(path, threads=threads))
        rows.append((f"{path.name} compiled", status_bytes("self", "VmRSS") / GIB))
        runners[-1].run(zeros(kind, batch))
        gc.collect()
        rows.append((f"{path.name} after a batch of {batch}", status_bytes("self", "VmRSS") / GIB))
    rows.append(("peak resident size (VmHWM)", status_bytes("self", "VmHWM") / GIB))
    return rows


def served(onnx_dir: Path, names: list[str], inputs: list[str], batch: int, work: Path) -> list[tuple[str, float]]:
    """The cpu target served by the local tritonserver; (what, GiB) rows summed over its processes."""
    import psutil

    from hrnet_build.repository import RepositoryOptions, Target, write_repository
    from hrnet_client.triton import TritonClassifier
    from hrnet_triton.server import LocalTritonServer, Ports

    chosen = [variants.get(n) for n in names]
    repo = work / "repository"
    write_repository(
        Target.CPU, chosen, repo, RepositoryOptions.for_target(Target.CPU), onnx_dir=onnx_dir, kinds=inputs
    )
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    ports = Ports(*(s.getsockname()[1] for s in socks))
    for s in socks:
        s.close()

    def processes() -> list[psutil.Process]:
        root = psutil.Process(server.process.pid)
        return [root, *root.children(recursive=True)]

    rows = []
    with LocalTritonServer(
        repo, serve_env=REPO_ROOT / ".venv-serve", ports=ports, log_file=work / "triton.log"
    ) as server:
        procs = processes()
        rows.append((f"{len(procs)} processes, every model loaded: PSS", sum(pss_bytes(p.pid) for p in procs) / GIB))
        for name in names:
            for kind in inputs:
                with TritonClassifier(server.http_url.removeprefix("http://"), name, input=kind) as client:
                    client.run_batches([zeros(kind, min(batch, client.max_batch))])
        procs = processes()
        rows.append((f"after one batch of {batch} to each model: PSS", sum(pss_bytes(p.pid) for p in procs) / GIB))
        rows.append(
            ("sum of each process's peak resident size (VmHWM)", sum(status_bytes(p.pid, "VmHWM") for p in procs) / GIB)
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx-dir", type=Path, required=True, help="X.onnx and X_uint8.onnx of each variant")
    ap.add_argument("--variants", default="all", help="comma-separated seed names, or all (default)")
    ap.add_argument("--inputs", default="tensor,uint8", help="the models of each variant: tensor and/or uint8")
    ap.add_argument("--how", choices=("one-process", "served"), default="one-process")
    ap.add_argument("--batch", type=int, default=16, help="images in the one batch sent to each model")
    ap.add_argument("--threads", type=int, default=4, help="one-process: OpenVINO threads per model (the pod's CPUs)")
    args = ap.parse_args(argv)
    names = [v.name for v in variants.VARIANTS] if args.variants == "all" else args.variants.split(",")
    inputs = args.inputs.split(",")
    files = model_files(args.onnx_dir, names, inputs)
    if args.how == "one-process":
        rows = one_process(files, args.batch, args.threads)
    else:
        with tempfile.TemporaryDirectory(prefix="hrnet-memory-") as work:
            rows = served(args.onnx_dir, names, inputs, args.batch, Path(work))
    import openvino as ov

    print(
        f"\n{args.how}: {len(names)} variants x {inputs} = {len(files)} models, offline weights; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}; openvino {ov.__version__.split('-')[0]}\n"
    )
    print("| what | GiB |\n|---|---:|")
    for what, gib in rows:
        print(f"| {what} | {gib:.2f} |")


if __name__ == "__main__":
    main()
