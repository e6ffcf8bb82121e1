"""How much memory serving the variants takes on the CPU: the figure a pod's memory limit rests on.

Three measurements, on ONNX models already exported into ``--onnx-dir`` (``X.onnx`` and its
``X_uint8.onnx``, as ``hrnet-triton export`` writes them):

- ``one-process``: every model compiled by OpenVINO (FP32) in this one process and one batch of
  ``--batch`` images run through it (as Triton's warm-up does at load), model after model, all
  kept: the arrangement of Triton's openvino backend (the onnx target of the cpu overlay), where
  model instances are threads of the one server process. Resident size (RSS) after each compile
  and after each batch (OpenVINO keeps the memory of the largest batch it ran), and the peak.
  The baseline is taken with OpenVINO already loaded, so no model is billed for the library.
- ``each-alone``: the same for each model in a fresh process of its own: what one model adds,
  whatever was loaded before it (the per-variant figures a pod is sized from).
- ``served``: the ``cpu`` target as ``hrnet-triton repo`` writes it (OpenVINO FP32 through
  Triton's python backend, one stub process per model instance; ``image`` in ``--inputs`` adds
  the image ensemble and ``hrnet_preprocess``), on the local ``tritonserver``. Per process, the
  proportional set size (PSS: a page shared by n processes counts 1/n to each) and the unique
  set size (USS: pages of that process alone), read once every model is loaded and warmed up
  and again after one request of up to ``--batch`` images to each model.

    python benchmarks/serving_memory.py --onnx-dir DIR --how one-process --batch 16
    python benchmarks/serving_memory.py --onnx-dir DIR --how each-alone --batch 16
    python benchmarks/serving_memory.py --onnx-dir DIR --variants HRNet_W18_C --how served --inputs tensor,uint8,image

Memory is read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import socket
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hrnet_core import variants
from hrnet_triton.perf_report import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
KINDS = ("tensor", "uint8", "image")  # image: the ensemble of hrnet_preprocess and the tensor model (served only)


def status_bytes(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def model_files(onnx_dir: Path, names: list[str], inputs: list[str]) -> list[tuple[str, Path]]:
    """The ONNX file of each model a server compiles: the tensor one (also behind ``image``) and the uint8 one."""
    files = []
    for name in names:
        for kind in [k for k in ("tensor", "uint8") if k in inputs or (k == "tensor" and "image" in inputs)]:
            path = onnx_dir / (f"{name}.onnx" if kind == "tensor" else f"{name}_uint8.onnx")
            if not path.is_file():
                raise SystemExit(f"{path} is missing: export it with `hrnet-triton export {name} --out ...`")
            files.append((kind, path))
    return files


def zeros(kind: str, batch: int) -> np.ndarray:
    return np.zeros((batch, 224, 224, 3), np.uint8) if kind == "uint8" else np.zeros((batch, 3, 224, 224), np.float32)


def one_process(files: list[tuple[str, Path]], batch: int, threads: int) -> list[tuple[str, float]]:
    """Compile each model here and run one batch through it, keeping them all; (what, GiB resident) rows."""
    import openvino as ov

    from hrnet_core.runtime import OpenVinoRunner

    ov.Core().get_property("CPU", "FULL_DEVICE_NAME")  # the library and its CPU plugin, before the baseline
    rows = [("this process, OpenVINO loaded, no model", status_bytes("self", "VmRSS") / GIB)]
    runners = []
    for kind, path in files:
        runners.append(OpenVinoRunner(path, threads=threads))
        rows.append((f"{path.name} compiled", status_bytes("self", "VmRSS") / GIB))
        runners[-1].run(zeros(kind, batch))
        gc.collect()
        rows.append((f"{path.name} after a batch of {batch}", status_bytes("self", "VmRSS") / GIB))
    rows.append(("peak resident size (VmHWM)", status_bytes("self", "VmHWM") / GIB))
    return rows


def each_alone(files: list[tuple[str, Path]], batch: int, threads: int) -> list[tuple[str, float]]:
    """Each model in a fresh process: (what, GiB it adds over that process's baseline) rows."""
    rows = []
    context = multiprocessing.get_context("spawn")
    for kind, path in files:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            alone = pool.submit(one_process, [(kind, path)], batch, threads).result()
        base = alone[0][1]
        rows.append((f"{path.name}, compiled and after a batch of {batch}", alone[2][1] - base))
    return rows


def _memory(pid: int) -> tuple[float, float]:
    """(PSS, USS) of a process, GiB, from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Private_Clean", "Private_Dirty"):
            fields[key] = int(rest.split()[0]) * 1024
    return fields["Pss"] / GIB, (fields["Private_Clean"] + fields["Private_Dirty"]) / GIB


def _served_rows(procs, when: str) -> list[tuple[str, float]]:
    """One row per process (tritonserver, or the model a python-backend stub runs) and the totals."""
    rows, pss_total, uss_total = [], 0.0, 0.0
    for p in procs:
        pss, uss = _memory(p.pid)
        pss_total, uss_total = pss_total + pss, uss_total + uss
        cmd = p.cmdline()
        what = (
            "tritonserver"
            if p.name() == "tritonserver"
            else Path(cmd[1]).parent.parent.name
            if len(cmd) > 1
            else p.name()
        )
        rows.append((f"{when}: {what} (pid {p.pid}), PSS / USS", f"{pss:.2f} / {uss:.2f}"))
    rows.append((f"{when}: all {len(procs)} processes, PSS / USS", f"{pss_total:.2f} / {uss_total:.2f}"))
    return rows


def served(onnx_dir: Path, names: list[str], inputs: list[str], batch: int, work: Path) -> list[tuple[str, str]]:
    """The cpu target served by the local tritonserver; per-process and total rows, GiB."""
    import psutil

    from hrnet_build.repository import RepositoryOptions, Target, write_repository
    from hrnet_client.triton import TritonClassifier
    from hrnet_triton.server import LocalTritonServer, Ports

    repo = work / "repository"
    options = RepositoryOptions.for_target(Target.CPU)
    write_repository(Target.CPU, [variants.get(n) for n in names], repo, options, onnx_dir=onnx_dir, kinds=inputs)
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    ports = Ports(*(s.getsockname()[1] for s in socks))
    for s in socks:
        s.close()
    with LocalTritonServer(
        repo, serve_env=REPO_ROOT / ".venv-serve", ports=ports, log_file=work / "triton.log"
    ) as server:
        root = psutil.Process(server.process.pid)
        rows = _served_rows([root, *root.children(recursive=True)], "loaded")
        sent = min(batch, options.max_batch_size)
        for name in names:
            for kind in (k for k in inputs if k != "image"):  # the image ensemble runs the tensor model
                with TritonClassifier(server.http_url.removeprefix("http://"), name, input=kind) as client:
                    client.run_batches([zeros(kind, sent)])
        rows += _served_rows([root, *root.children(recursive=True)], f"after a batch of {sent} to each model")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx-dir", type=Path, required=True, help="X.onnx and X_uint8.onnx of each variant")
    ap.add_argument("--variants", default="all", help="comma-separated seed names, or all (default)")
    ap.add_argument("--inputs", default="tensor,uint8", help=f"the served inputs, of {', '.join(KINDS)}")
    ap.add_argument("--how", choices=("one-process", "each-alone", "served"), default="one-process")
    ap.add_argument("--batch", type=int, default=16, help="images in the one batch sent to each model")
    ap.add_argument("--threads", type=int, default=4, help="OpenVINO threads per model (the pod's CPUs)")
    args = ap.parse_args(argv)
    names = [v.name for v in variants.VARIANTS] if args.variants == "all" else args.variants.split(",")
    inputs = args.inputs.split(",")
    if not inputs or set(inputs) - set(KINDS):
        ap.error(f"--inputs takes {', '.join(KINDS)}, got {args.inputs!r}")
    files = model_files(args.onnx_dir, names, inputs)
    if args.how == "one-process":
        rows = [(what, f"{gib:.2f}") for what, gib in one_process(files, args.batch, args.threads)]
    elif args.how == "each-alone":
        rows = [(what, f"{gib:.2f}") for what, gib in each_alone(files, args.batch, args.threads)]
    else:
        with tempfile.TemporaryDirectory(prefix="hrnet-memory-") as work:
            rows = served(args.onnx_dir, names, inputs, args.batch, Path(work))
    import openvino as ov

    print(
        f"\n{args.how}: {len(names)} variants, inputs {inputs}: {len(files)} ONNX models, offline weights; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}; openvino {ov.__version__.split('-')[0]}\n"
    )
    print("| what | GiB |\n|---|---:|")
    for what, gib in rows:
        print(f"| {what} | {gib} |")


if __name__ == "__main__":
    main()
