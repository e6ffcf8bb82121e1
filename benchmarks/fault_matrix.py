"""`hrnet-triton classify` of many files through a server that is killed with SIGKILL mid-run and
restarted: does every file end with its answer or its own error, and does the client's memory stay flat?

1. ``--files`` JPEGs (default 2,000) are generated in a temporary folder from the sample
   photographs: each a different crop of one of them, flipped every other time, re-encoded.
2. The ``cpu`` target's HRNet_W18_C (offline weights, exported once into the folder, or
   ``--onnx``) is served by the nvidia-pytriton ``tritonserver``.
3. ``hrnet-triton classify --files-from LIST --concurrency 4 --json`` runs as a process.
4. ``--kill-after`` seconds after it started (default 180) the server gets SIGKILL; ``--outage``
   seconds after the kill (default 10) a new server starts on the same ports.
5. When the client has exited: how many files were answered, how many have an error, how many
   are missing from the output (must be 0), its exit code, and its peak RSS (the kernel's
   high-water mark, ``VmHWM``, read while it runs).

    python benchmarks/fault_matrix.py                      # the full run: about 4 minutes on 2 cores
    python benchmarks/fault_matrix.py --kill-after 40      # the kill sooner
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2

from hrnet_core.samples import sample_images
from hrnet_triton.server import LocalTritonServer, Ports, default_serve_env

MODEL = "HRNet_W18_C"


def generate_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct JPEGs made from the sample photographs (crops of 80-100 %, some flipped)."""
    folder.mkdir(parents=True)
    photos = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sample_images()]
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        keep = 0.8 + 0.2 * ((i * 7919) % 100) / 100
        ch, cw = max(1, int(h * keep)), max(1, int(w * keep))
        top, left = (i * 31) % (h - ch + 1), (i * 17) % (w - cw + 1)
        crop = img[top : top + ch, left : left + cw]
        path = folder / f"img{i:05d}.jpg"
        cv2.imwrite(str(path), crop[:, ::-1] if i % 2 else crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def free_ports() -> Ports:
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = Ports(*(s.getsockname()[1] for s in socks))
    for s in socks:
        s.close()
    return ports


def repository(work: Path, onnx: Path | None) -> Path:
    from hrnet_build.repository import Target, write_repository
    from hrnet_core import variants

    if onnx is None:
        from hrnet_build.export import export_onnx
        from hrnet_build.weights import WeightsSpec

        onnx = work / "onnx" / f"{MODEL}.onnx"
        print(f"exporting {MODEL} with offline weights to {onnx} (about a minute)", flush=True)
        export_onnx(variants.get(MODEL), WeightsSpec.parse("offline"), onnx, progress=False)
    write_repository(Target.CPU, [variants.get(MODEL)], work / "repo", onnx_dir=onnx.parent)
    return work / "repo"


@dataclass
class Run:
    pid: int
    returncode: int
    peak_rss_mb: float
    killed_at: float | None
    restarted_at: float | None
    seconds: float
    rss_mb: dict[str, float]  # the largest RSS sampled before the kill, during the outage, after the restart


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its highest since it started its program
    (VmHWM, kept by the kernel, so no peak between two samples is missed), in MB; 0 once it is gone.

    Not ``wait4``'s ``ru_maxrss``: it also counts the parent's pages the child had before exec,
    which after an in-process export (Paddle loaded) is over a gigabyte that the client never used.
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(f"{field}:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run(args: argparse.Namespace, work: Path, listing: Path, repo: Path) -> Run:
    """The client as a process; the server killed and restarted on schedule while it runs."""
    ports = free_ports()
    server = LocalTritonServer(repo, serve_env=args.serve_env, ports=ports, log_file=work / "triton-1.log").start()
    again = LocalTritonServer(repo, serve_env=args.serve_env, ports=ports, log_file=work / "triton-2.log")
    cmd = [sys.executable, "-m", "hrnet_triton.cli", "classify", "--files-from", str(listing), "--json"]
    cmd += ["--url", f"127.0.0.1:{ports.http}", "--model", MODEL, "--concurrency", str(args.concurrency)]
    cmd += ["--retry-seconds", str(args.retry_seconds), "--top-k", "1"]
    killed_at = restarted_at = proc = None
    phases = {"before the kill": 0.0, "during the outage": 0.0, "after the restart": 0.0}
    try:
        with open(work / "out.json", "w") as out, open(work / "err.txt", "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        start, shown, peak = time.monotonic(), 0.0, 0.0
        while (done := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            now = time.monotonic() - start
            phase = list(phases)[(killed_at is not None) + (restarted_at is not None)]
            phases[phase] = max(phases[phase], rss := rss_mb(proc.pid))
            peak = max(peak, rss_mb(proc.pid, "VmHWM"))
            if now >= shown + args.every:
                shown = now
                written = (work / "out.json").stat().st_size >> 10
                print(f"{now:6.1f} s  client RSS {rss:.0f} MB, {written} KB of results written", flush=True)
            if killed_at is None and now >= args.kill_after:
                os.kill(server.process.pid, signal.SIGKILL)
                killed_at = now
                print(f"{now:6.1f} s  server killed (SIGKILL to tritonserver {server.process.pid})", flush=True)
                server.stop()  # clean up what it left: its Python-backend stubs
            elif killed_at is not None and restarted_at is None and now >= killed_at + args.outage:
                print(f"{now:6.1f} s  starting a new server on the same ports", flush=True)
                again.start()
                restarted_at = time.monotonic() - start
                print(f"{restarted_at:6.1f} s  new server ready", flush=True)
            time.sleep(0.2)
        seconds = time.monotonic() - start
        status = done[1]
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc is not None and proc.returncode is None:  # interrupted: leave no client behind
            proc.kill()
            proc.wait()
        server.stop()
        again.stop()
    return Run(proc.pid, proc.returncode, peak, killed_at, restarted_at, seconds, phases)


def report(args: argparse.Namespace, work: Path, images: list[Path], result: Run) -> int:
    rows = json.loads((work / "out.json").read_text() or "[]")
    stderr = (work / "err.txt").read_text()
    seen = {r["image"] for r in rows}
    answered = sum(1 for r in rows if r["top"] and not r["error"])
    errored = sum(1 for r in rows if r["error"])
    missing = sum(1 for p in images if str(p) not in seen)
    retries = stderr.count("retrying in")
    kill = f"{result.killed_at:.1f} s" if result.killed_at is not None else "never (the client finished first)"
    back = f"{result.restarted_at:.1f} s" if result.restarted_at is not None else "never"
    print(f"\nfiles {len(images)}, concurrency {args.concurrency}, --retry-seconds {args.retry_seconds:g}")
    print(f"server killed at {kill}; new server ready at {back}; client ran {result.seconds:.1f} s")
    print(f"answered {answered}, errored {errored}, missing {missing}")
    print(f"client exit code {result.returncode}, peak RSS {result.peak_rss_mb:.0f} MB")
    print("largest RSS sampled: " + ", ".join(f"{v:.0f} MB {k}" for k, v in result.rss_mb.items()))
    print(f"retries logged {retries}; traceback in its stderr: {'yes' if 'Traceback' in stderr else 'no'}")
    if errored:
        first = next(r for r in rows if r["error"])
        print(f"first error: {first['image']}: {first['error']}")
    return 0 if missing == 0 and "Traceback" not in stderr else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="images to classify (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=4, help="the client's --concurrency (default: %(default)s)")
    ap.add_argument("--kill-after", type=float, default=180, help="seconds into the run (default: %(default)g)")
    ap.add_argument("--outage", type=float, default=10, help="seconds from the kill to the restart (%(default)g)")
    ap.add_argument("--retry-seconds", type=float, default=30, help="the client's --retry-seconds (%(default)g)")
    ap.add_argument("--onnx", type=Path, help=f"an exported {MODEL}.onnx (default: export offline weights)")
    ap.add_argument("--serve-env", type=Path, default=default_serve_env(), help="the numpy<2 serving environment")
    ap.add_argument("--every", type=float, default=30, help="print the client's RSS this often (%(default)g s)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (images, output, logs)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hrnet-fault-matrix-"))
    try:
        images = generate_images(work / "images", args.files)
        listing = work / "files.txt"
        listing.write_text("".join(f"{p}\n" for p in images))
        print(f"{len(images)} images in {work / 'images'}", flush=True)
        result = run(args, work, listing, repository(work, args.onnx))
        return report(args, work, images, result)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
