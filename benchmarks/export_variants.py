"""Benchmark: export every seed variant (offline weights) and tabulate time, memory, size, parity.

Each export runs as its own ``hrnet-triton export`` process, so the peak RSS is that export's
alone. Results: one JSON line per variant on stdout while running, then a Markdown table.

    python benchmarks/export_variants.py --out artifacts/bench-export [VARIANT ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from hrnet_core import variants
from hrnet_core.manifest import ExportManifest


def run(name: str, out: Path) -> dict:
    onnx = out / f"{name}.onnx"
    cmd = ["hrnet-triton", "-q", "export", name, "--weights", "offline", "--out", str(onnx), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": round(wall, 1)}
    m = ExportManifest.read(onnx)  # X.onnx.json
    return {
        "variant": name,
        "wall_s": round(wall, 1),
        "export_s": m.export_seconds,
        "peak_rss_mib": m.peak_rss_mib,
        "onnx_mb": round(m.onnx_bytes / 1e6, 1),
        "max_abs_dprob": m.parity.max_abs_dprob,
        "top5_identical": m.parity.top5_identical,
        "top1_range": [round(m.parity.min_top1_prob, 3), round(m.parity.max_top1_prob, 3)],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=variants.names())
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench-export"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        row = run(variants.get(name).name, args.out)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        f"\n{date.today()}, {platform.node()}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    print(
        "| model | export (s) | wall incl. start-up (s) | peak RSS (MiB) | ONNX (MB) | max abs Δprob "
        "| top-5 identical | top-1 prob range |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {' '.join(r['error'])} | | | | | | |")
            continue
        print(
            f"| {r['variant']} | {r['export_s']:.0f} | {r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['onnx_mb']:.1f} | {r['max_abs_dprob']:.2e} | {'yes' if r['top5_identical'] else 'NO'} | "
            f"{r['top1_range'][0]}–{r['top1_range'][1]} |"
        )
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
