"""What each input of a served variant costs: bytes on the wire, client CPU, images/s, server time.

HRNet_W18_C (offline weights) on the ``cpu`` target, served three ways by one local Triton
server, as ``hrnet-triton repo`` writes the repository: ``HRNet_W18_C`` (float32 tensors),
``HRNet_W18_C_uint8`` (uint8 crops) and ``HRNet_W18_C_image`` (the files' bytes; an ensemble of
``hrnet_preprocess`` and ``HRNet_W18_C``). The client is ``hrnet_client.TritonClassifier`` on
the same machine, classifying files, one image per request. Three sets of files:

- ``photos``: the sample photographs (scikit-image's; 5 PNG, 2 JPEG, 0.15-0.87 MP);
- ``imagenet``: ImageNet-sized JPEGs, each photograph resized to 500x375 (375x500 if portrait),
  at the JPEG quality (90-100) that brings its file nearest 130 KB;
- ``12mp``: a 12-megapixel JPEG, a photograph upscaled to 4000x3000 with OpenCV (bicubic),
  quality 90.

Measured in one run, in ``--rounds`` interleaved rounds (each figure is the median):

1. bytes on the wire per image, each way, over HTTP and gRPC, counted by a TCP relay (in a
   process of its own) between the client and the server;
2. the client's CPU time per image: ``resource.getrusage`` (user + system, every thread of the
   client's process) around the classification of the files;
3. images/s classified from files, end to end, at each ``--concurrency``, and the best;
4. for the image input, the server's mean time per request in each step of the ensemble (queue
   and compute of ``hrnet_preprocess`` and ``HRNet_W18_C``), from Triton's statistics API;
5. decode + preprocess time per image on one core, in-process (``time.thread_time``), with the
   function the server runs (``hrnet_core.preprocess.tensor_from_bytes``).

Then, on paper, for the gpu target at ``--target-rate`` images/s: the network bandwidth each
input needs, and the cores server-side decoding needs.

    python benchmarks/input_costs.py --rounds 3 --workdir /tmp/input-costs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import cv2
import numpy as np

from hrnet_build.export import export_onnx
from hrnet_build.repository import Target, write_repository
from hrnet_build.weights import WeightsSpec
from hrnet_client.triton import TritonClassifier
from hrnet_core import variants
from hrnet_core.contract import INPUT_KINDS, PREPROCESS_MODEL, model_name
from hrnet_core.preprocess import crop_from_bytes, tensor_from_bytes
from hrnet_core.samples import sample_images
from hrnet_triton.bench import model_stats, server_split
from hrnet_triton.perf_report import cpu_model
from hrnet_triton.server import LocalTritonServer, Ports

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANT = "HRNet_W18_C"
# ImageNet's photographs are about 500x375 and 110-130 KB. The sample photographs, downscaled, are
# smoother than a camera's: each is saved at the JPEG quality (90-100) that brings it nearest this size.
IMAGENET_BYTES = 130_000


# -- the files -------------------------------------------------------------------------------------


def make_files(work: Path) -> dict[str, list[Path]]:
    """The three sets of files (written once into ``work``)."""
    photos = sample_images()
    imagenet = []
    for path in photos:
        out = work / "imagenet" / f"{path.stem}.jpg"
        if not out.is_file():
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            size = (500, 375) if img.shape[1] >= img.shape[0] else (375, 500)
            small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            encoded = [cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, q])[1] for q in range(90, 101)]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(min(encoded, key=lambda e: abs(len(e) - IMAGENET_BYTES)).tobytes())
        imagenet.append(out)
    big = work / "12mp" / "chelsea_4000x3000.jpg"
    if not big.is_file():
        img = cv2.imread(str(next(p for p in photos if p.stem == "chelsea")), cv2.IMREAD_COLOR)
        big.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(
            str(big), cv2.resize(img, (4000, 3000), interpolation=cv2.INTER_CUBIC), [cv2.IMWRITE_JPEG_QUALITY, 90]
        )
    return {"photos": photos, "imagenet": imagenet, "12mp": [big]}


# -- a TCP relay that counts the bytes each way ------------------------------------------------------


def _pump(src: socket.socket, dst: socket.socket, counter) -> None:
    try:
        while data := src.recv(1 << 16):
            with counter.get_lock():
                counter.value += len(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay(port_out, upstream: int, up, down) -> None:  # runs in a process of its own
    server = socket.create_server(("127.0.0.1", 0))
    port_out.put(server.getsockname()[1])
    while True:
        client, _ = server.accept()
        target = socket.create_connection(("127.0.0.1", upstream))
        for src, dst, counter in ((client, target, up), (target, client, down)):
            threading.Thread(target=_pump, args=(src, dst, counter), daemon=True).start()


class Relay:
    """``127.0.0.1:port`` relays to ``upstream``, counting bytes client -> server (up) and back (down)."""

    def __init__(self, upstream: int):
        ctx = multiprocessing.get_context("spawn")
        self.up, self.down, ports = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Queue()
        self.process = ctx.Process(target=_relay, args=(ports, upstream, self.up, self.down), daemon=True)
        self.process.start()
        self.port = ports.get(timeout=30)

    def reset(self) -> None:
        self.up.value = self.down.value = 0

    def counts(self) -> tuple[int, int]:
        return self.up.value, self.down.value

    def close(self) -> None:
        self.process.kill()


# -- measurements --------------------------------------------------------------------------------------


def wire_bytes(server: LocalTritonServer, files: dict[str, list[Path]]) -> dict[tuple, tuple[float, float]]:
    """(protocol, set, kind) -> bytes per image (up, down), one image per request."""
    out = {}
    for protocol in ("http", "grpc"):
        relay = Relay(server.ports.http if protocol == "http" else server.ports.grpc)
        try:
            for name, paths in files.items():
                for kind in INPUT_KINDS:
                    with TritonClassifier(f"127.0.0.1:{relay.port}", VARIANT, protocol, input=kind) as clf:
                        relay.reset()
                        preds = clf.classify_files(paths, k=1, batch_size=1)
                        assert all(p.top for p in preds), preds
                        time.sleep(0.2)  # let the relay count the last answer
                        up, down = relay.counts()
                    out[protocol, name, kind] = (up / len(paths), down / len(paths))
        finally:
            relay.close()
    return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _stats(server: LocalTritonServer, kind: str) -> dict[str, dict]:
    names = [model_name(VARIANT, kind)] + ([PREPROCESS_MODEL, VARIANT] if kind == "image" else [])
    return {n: model_stats(server.http_url, n, server.admin_key) for n in names}


def end_to_end(server: LocalTritonServer, paths: list[Path], kind: str, concurrency: int) -> dict[str, float]:
    """Classify ``paths`` from files over HTTP, one image per request: images/s, the client's CPU ms per
    image, and for the image input each ensemble step's mean queue and compute ms per request."""
    with TritonClassifier(server.http_url, VARIANT, input=kind, concurrency=concurrency) as clf:
        clf.classify_files(paths[: 2 * concurrency], k=1, batch_size=1)  # warm the lanes
        before, cpu0, t0 = _stats(server, kind), _cpu_seconds(), time.perf_counter()
        preds = clf.classify_files(paths, k=1, batch_size=1)
        t1, cpu1, after = time.perf_counter(), _cpu_seconds(), _stats(server, kind)
    assert all(p.top and not p.error for p in preds), [p.error for p in preds if p.error]
    result = {"images_per_s": len(paths) / (t1 - t0), "client_cpu_ms": 1000 * (cpu1 - cpu0) / len(paths)}
    if kind == "image":
        for step in (PREPROCESS_MODEL, VARIANT):
            result[f"{step} queue ms"], result[f"{step} compute ms"] = server_split(before[step], after[step])
    return result


def decode_ms(files: dict[str, list[Path]], repeat: int = 5) -> dict[tuple[str, str], float]:
    """(set, what) -> CPU ms per image on this thread: the server's tensor_from_bytes, the uint8 client's
    crop_from_bytes, cv2.imdecode alone, and (for 12 MP) libjpeg's 1/8-scale decode."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    steps = {
        "decode + preprocess (server, tensor)": tensor_from_bytes,
        "decode + resize + crop (uint8 client)": crop_from_bytes,
        "cv2.imdecode": lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
        "cv2.imdecode at 1/8 scale": lambda data: cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8
        ),
    }
    for name, paths in files.items():
        for path in paths:
            data = path.read_bytes()
            for what, step in steps.items():
                step(data)  # warm
                times = []
                for _ in range(repeat):
                    t0 = time.thread_time()
                    step(data)
                    times.append(time.thread_time() - t0)
                out[name, what].append(1000 * statistics.median(times))
    return {key: statistics.mean(v) for key, v in out.items()}  # the mean over the set's files


# -- the run and the report ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is the median (default: 3)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="requests in flight to sweep (default: 1,2,4,8)")
    ap.add_argument("--repeat", type=int, default=4, help="each set's files, this many times per point (default: 4)")
    ap.add_argument("--target-rate", type=float, default=4500.0, help="images/s for the estimates (default: 4500)")
    ap.add_argument("--serve-env", type=Path, default=REPO_ROOT / ".venv-serve")
    ap.add_argument("--workdir", type=Path, required=True, help="the export, the repository and the files go here")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def free_ports() -> Ports:
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return Ports(*(s.getsockname()[1] for s in socks))
    finally:
        for s in socks:
            s.close()


def serve(args: argparse.Namespace) -> LocalTritonServer:
    variant = variants.get(VARIANT)
    onnx = args.workdir / f"{VARIANT}.onnx"
    if not onnx.is_file():  # writes HRNet_W18_C_uint8.onnx beside it too
        export_onnx(variant, WeightsSpec.parse("offline"), onnx, progress=False)
    write_repository(Target.CPU, [variant], args.workdir / "repository", onnx_dir=args.workdir)
    return LocalTritonServer(
        args.workdir / "repository", serve_env=args.serve_env, ports=free_ports(), log_file=args.workdir / "triton.log"
    )


def measure(server: LocalTritonServer, files: dict[str, list[Path]], args: argparse.Namespace) -> dict:
    """Every point of every round, interleaved: {(set, kind, concurrency): [result per round]}, and decode."""
    runs: dict[tuple, list[dict]] = defaultdict(list)
    decode: dict[tuple, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        for name, paths in files.items():
            many = paths * args.repeat * (3 if name == "12mp" else 1)
            for kind in INPUT_KINDS:
                for c in args.concurrency:
                    runs[name, kind, c].append(end_to_end(server, many, kind, c))
                    print(f"round {r + 1}: {name} {kind} c={c}: {runs[name, kind, c][-1]}", flush=True)
        for key, ms in decode_ms(files).items():
            decode[key].append(ms)
    return {"runs": runs, "decode": decode}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def report(files, wire, results, args) -> None:
    from importlib.metadata import version

    print(
        f"\n{VARIANT} (offline weights), cpu target, {date.today()}; {cpu_model()}, {os.cpu_count()} cores, shared "
        f"by server and client; tritonserver from nvidia-pytriton {version('nvidia-pytriton')}, tritonclient "
        f"{version('tritonclient')}, OpenCV {cv2.__version__}; median of {args.rounds} interleaved rounds; "
        f"load average {args.load[0]:.1f} at the start, {args.load[1]:.1f} at the end\n"
    )
    sizes = {n: statistics.mean(p.stat().st_size for p in ps) for n, ps in files.items()}
    print("| files | mean file bytes | " + " | ".join(f"{k}: up / down, HTTP (gRPC)" for k in INPUT_KINDS) + " |")
    print("|---|---:|" + "---:|" * len(INPUT_KINDS))
    for n in files:
        cells = [
            f"{wire['http', n, k][0]:,.0f} / {wire['http', n, k][1]:,.0f} ({wire['grpc', n, k][0]:,.0f} / "
            f"{wire['grpc', n, k][1]:,.0f})"
            for k in INPUT_KINDS
        ]
        print(f"| {n} | {sizes[n]:,.0f} | " + " | ".join(cells) + " |")
    runs = results["runs"]
    print(
        "\n| files | input | client CPU ms/image | "
        + " | ".join(f"img/s c={c}" for c in args.concurrency)
        + " | best |"
    )
    print("|---|---|---:|" + "---:|" * (len(args.concurrency) + 1))
    for n in files:
        for k in INPUT_KINDS:
            rates = [median(runs[n, k, c], "images_per_s") for c in args.concurrency]
            cpu = statistics.median(row["client_cpu_ms"] for c in args.concurrency for row in runs[n, k, c])
            print(f"| {n} | {k} | {cpu:.1f} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {max(rates):.1f} |")
    print("\n| files | concurrency | hrnet_preprocess queue / compute ms | HRNet_W18_C queue / compute ms |")
    print("|---|---:|---:|---:|")
    for n in files:
        for c in args.concurrency:
            rows = runs[n, "image", c]
            steps = [
                f"{median(rows, f'{s} queue ms'):.1f} / {median(rows, f'{s} compute ms'):.1f}"
                for s in (PREPROCESS_MODEL, VARIANT)
            ]
            print(f"| {n} | {c} | " + " | ".join(steps) + " |")
    report_paper(files, wire, results, args)


def report_paper(files, wire, results, args) -> None:
    decode = {key: statistics.median(v) for key, v in results["decode"].items()}
    whats = list(dict.fromkeys(w for _, w in decode))
    print("\n| files | " + " | ".join(f"{w} ms/image, one core" for w in whats) + " |")
    print("|---|" + "---:|" * len(whats))
    for n in files:
        print(f"| {n} | " + " | ".join(f"{decode[n, w]:.2f}" for w in whats) + " |")
    rate, runs = args.target_rate, results["runs"]
    served = {n: median(runs[n, "image", min(args.concurrency)], f"{PREPROCESS_MODEL} compute ms") for n in files}
    print(f"\nOn paper, at {rate:,.0f} images/s (bytes up per image over HTTP, measured above):\n")
    print(
        "| files | " + " | ".join(f"{k}: Gbit/s" for k in INPUT_KINDS) + " | cores to decode + preprocess, in-process "
        f"| {PREPROCESS_MODEL} compute ms/image at concurrency {min(args.concurrency)} | cores, as served |"
    )
    print("|---|" + "---:|" * (len(INPUT_KINDS) + 3))
    for n in files:
        gbit = [wire["http", n, k][0] * rate * 8 / 1e9 for k in INPUT_KINDS]
        cores = rate * decode[n, "decode + preprocess (server, tensor)"] / 1000
        cells = [f"{g:.1f}" for g in gbit] + [f"{cores:.0f}", f"{served[n]:.1f}", f"{rate * served[n] / 1000:.0f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = make_files(args.workdir)
    load = os.getloadavg()[0]
    with serve(args) as server:
        wire = wire_bytes(server, files)
        results = measure(server, files, args)
    args.load = (load, os.getloadavg()[0])  # the machine is shared: how busy it was
    report(files, wire, results, args)


if __name__ == "__main__":
    main()
