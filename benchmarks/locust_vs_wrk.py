"""Locust against an independent load generator (wrk), side by side, on one running server.

For each model, both tools hold the same number of connections (Locust users = wrk
connections), each sending the next request when the last is answered. wrk posts one prepared
binary KServe v2 request (JSON header + raw float32 tensor, made by tritonclient's own request
encoder); Locust runs loadtest/hrnet.py with the same tensor. Prints requests/s and median
latency of each, and their ratio.

    hrnet-triton serve --repo REPO &        # REPO holding HRNet_W18_C (and loadtest/trivial_repository's model)
    python benchmarks/locust_vs_wrk.py --host http://127.0.0.1:8000 --model HRNet_W18_C \
        --concurrency 2 --seconds 20 --rounds 3
    python benchmarks/locust_vs_wrk.py --host http://127.0.0.1:8000 --model trivial --payload tiny --concurrency 8
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "hrnet.py"


def request_body(model: str, url: str, payload: str, batch: int) -> tuple[bytes, int]:
    import tritonclient.http as httpclient

    from hrnet_core.preprocess import load_tensor
    from hrnet_core.samples import sample_images

    if payload == "tiny":
        x = np.zeros((batch, 3, 1, 1), np.float32)
    else:
        x = np.stack([load_tensor(p) for p in sample_images()[:batch]])
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], [out])
    req = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        data=body,
        method="POST",
        headers={"Inference-Header-Content-Length": str(json_size)},
    )
    with urllib.request.urlopen(req, timeout=60) as r:  # the prepared request must be answered, or wrk measures errors
        if r.status != 200:
            sys.exit(f"the prepared request got HTTP {r.status}")
    return body, json_size


def run_wrk(
    url: str, model: str, body_file: Path, json_size: int, connections: int, seconds: int
) -> tuple[float, float]:
    script = body_file.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{json_size}"\n'
    )
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            f"{url}/v2/models/{model}/infer",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        sys.exit(f"wrk saw failed requests:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()
    return rps, float(p50) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_locust(
    url: str, model: str, payload: str, batch: int, users: int, seconds: int, work: Path
) -> tuple[float, float]:
    prefix = work / "locust"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--host",
            url,
            "--model",
            model,
            "--input",
            "tensor",  # what wrk posts
            "--payload",
            payload,
            "--batch-size",
            str(batch),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            f"{seconds}s",
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=work,
    )
    with open(f"{prefix}_stats.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    if int(row["Failure Count"]):
        sys.exit(f"Locust saw {row['Failure Count']} failed requests")
    return float(row["Requests/s"]), float(row["50%"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="HRNet_W18_C")
    ap.add_argument("--payload", choices=["tensor", "tiny"], default="tensor")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (Debian/Ubuntu)")
    url = args.host.rstrip("/")
    work = Path(tempfile.mkdtemp(prefix="locust-vs-wrk-"))
    body, json_size = request_body(args.model, url, args.payload, args.batch_size)
    (work / "request.bin").write_bytes(body)
    runs: dict[str, list[tuple[float, float]]] = {"wrk": [], "locust": []}
    for r in range(args.rounds):  # alternating, so a slow spell of the machine hits both tools
        runs["wrk"].append(run_wrk(url, args.model, work / "request.bin", json_size, args.concurrency, args.seconds))
        runs["locust"].append(
            run_locust(url, args.model, args.payload, args.batch_size, args.concurrency, args.seconds, work)
        )
        print(f"round {r + 1}: wrk {runs['wrk'][-1]}, locust {runs['locust'][-1]}", file=sys.stderr, flush=True)
    wrk, loc = (tuple(statistics.median(v[i] for v in runs[k]) for i in (0, 1)) for k in ("wrk", "locust"))
    print(
        f"{args.model}, payload {args.payload}, batch {args.batch_size}, {args.concurrency} connections/users, "
        f"median of {args.rounds} alternating rounds of {args.seconds} s, {date.today()}\n"
    )
    print("| tool | requests/s | p50 ms |\n|---|---:|---:|")
    print(f"| wrk | {wrk[0]:.1f} | {wrk[1]:.1f} |\n| Locust (loadtest/hrnet.py) | {loc[0]:.1f} | {loc[1]:.1f} |")
    print(f"\nLocust / wrk: throughput {loc[0] / wrk[0]:.3f}, median latency {loc[1] / wrk[1]:.3f}")


if __name__ == "__main__":
    main()
