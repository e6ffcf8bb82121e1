"""This machine's CPU roofline: its clock, and its FP32 and BF16 peak, measured.

Three small C loops, compiled here with gcc, each run on every core at once (one process per
core) for ``--seconds`` of CPU time. Rates are per second of the process's own CPU time, so a
core shared with other work still gives its own clock (wall time would count the other work's
share as slowness):

- **clock**: a chain of dependent integer adds. Each add waits for the one before, so the chain
  runs one add per cycle, and adds per second is the clock the cores actually ran at (not the
  nominal figure of /proc/cpuinfo, which a virtual machine reports as its TSC rate).
- **FP32 peak**: twelve independent chains of AVX-512 FMAs (``vfmadd231ps``, 16 lanes x 2 FLOP).
- **BF16 peak**: the same with ``vdpbf16ps`` (AVX512_BF16: 32 BF16 products summed pairwise into
  16 FP32 lanes, 64 FLOP per instruction).

The per-cycle figures they give are the cores' vector units at work, measured rather than read
from a table (Zen 4 runs a 512-bit FMA as two 256-bit halves; Zen 5 does not).

With ``--onnx X.onnx`` it also counts the model's multiply-adds (every Conv and MatMul, from the
graph's shapes at batch 1) and prints the images/s each peak would allow: the roofline's
compute ceiling, which docs/cpu-speed.md compares with what each runtime reaches.

    python benchmarks/cpu_peak.py --seconds 3 --onnx artifacts/HRNet_W18_C.onnx
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

C_SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); /* CPU time: a time-shared core still counts its own cycles */
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ops_per_pass: the operations one pass performs; prints ops per second over `seconds`. The clock
   is read every 10000 passes only: reading it costs as much as a pass. */
#define TIMED(body, ops_per_pass)                                          \
    do {                                                                   \
        double t0 = now(), t; long passes = 0;                             \
        do { for (int p = 0; p < 10000; p++) { body; } passes += 10000; }  \
        while ((t = now() - t0) < seconds);                                \
        printf("%.6e\n", passes * (double)(ops_per_pass) / t);             \
    } while (0)

int main(int argc, char **argv) {
    double seconds = atof(argv[2]);
    if (!strcmp(argv[1], "clock")) {
        unsigned long x = 0;
        /* 1000 dependent adds per pass: one per cycle */
        TIMED(for (int i = 0; i < 100; i++) __asm__ volatile(
            "add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\t"
            "add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0" : "+r"(x)), 1000);
        return x == 0;
    }
    __m512 a0 = _mm512_set1_ps(1e-3f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
           a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    __m512 m = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-6f);
    if (!strcmp(argv[1], "fp32")) {
#define F(a) a = _mm512_fmadd_ps(a, m, c);
        /* 12 chains x 100 FMAs x 16 lanes x 2 FLOP per pass */
        TIMED(for (int i = 0; i < 100; i++) {
                  F(a0) F(a1) F(a2) F(a3) F(a4) F(a5) F(a6) F(a7) F(a8) F(a9) F(a10) F(a11) }
              __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5));
              __asm__ volatile("" : "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11)),
              12.0 * 100 * 16 * 2);
    } else {
        __m512bh b = _mm512_cvtne2ps_pbh(m, m);
#define B(a) a = _mm512_dpbf16_ps(a, b, b);
        /* 12 chains x 100 instructions x 32 BF16 products x 2 FLOP per pass */
        TIMED(for (int i = 0; i < 100; i++) {
                  B(a0) B(a1) B(a2) B(a3) B(a4) B(a5) B(a6) B(a7) B(a8) B(a9) B(a10) B(a11) }
              __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5));
              __asm__ volatile("" : "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11)),
              12.0 * 100 * 32 * 2);
    }
    float out[16];
    _mm512_storeu_ps(out, _mm512_add_ps(a0, a11));
    return out[0] < 0;
}
"""


def build(workdir: Path) -> Path:
    source, binary = workdir / "cpu_peak.c", workdir / "cpu_peak"
    source.write_text(C_SOURCE)
    subprocess.run(
        ["gcc", "-O2", "-mavx512f", "-mavx512bf16", "-o", str(binary), str(source)], check=True, capture_output=True
    )
    return binary


def on_every_core(binary: Path, kind: str, seconds: float, cores: int) -> list[float]:
    """Run the ``kind`` loop once per core at the same time; each process's ops per second."""

    def one(_):
        done = subprocess.run([str(binary), kind, str(seconds)], check=True, capture_output=True, text=True)
        return float(done.stdout)

    with ThreadPoolExecutor(cores) as pool:
        return list(pool.map(one, range(cores)))


def measure(seconds: float = 3.0, cores: int | None = None) -> dict[str, float]:
    """Clock (Hz, per core) and the whole machine's FP32 and BF16 FLOP/s (the slowest core's times the
    cores), measured."""
    cores = cores or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        clock = min(on_every_core(binary, "clock", seconds, cores))
        fp32 = min(on_every_core(binary, "fp32", seconds, cores)) * cores
        bf16 = min(on_every_core(binary, "bf16", seconds, cores)) * cores
    return {"cores": cores, "clock_hz": clock, "fp32_flops": fp32, "bf16_flops": bf16}


def model_macs(onnx_path: Path) -> float:
    """Multiply-adds per image of an exported model: its Conv and MatMul nodes at batch 1."""
    import numpy as np
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    for graph_input in model.graph.input:
        graph_input.type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    values = [*model.graph.value_info, *model.graph.output]
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = 0.0
    for node in model.graph.node:
        if node.op_type == "Conv":  # out elements x (in channels / groups) x kernel
            macs += float(np.prod(shapes[node.output[0]])) * float(np.prod(weights[node.input[1]][1:]))
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            macs += float(np.prod(weights[node.input[1]]))
    return macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per loop (default: 3)")
    ap.add_argument("--onnx", type=Path, help="also give the images/s ceiling of this exported model")
    args = ap.parse_args()
    m = measure(args.seconds)
    per_cycle = {k: m[k] / m["cores"] / m["clock_hz"] for k in ("fp32_flops", "bf16_flops")}
    print(f"{m['cores']} cores at {m['clock_hz'] / 1e9:.2f} GHz (dependent-add chain; the slowest core)")
    print(f"FP32 peak {m['fp32_flops'] / 1e9:.0f} GFLOP/s = {per_cycle['fp32_flops']:.1f} FLOP/cycle/core")
    print(f"BF16 peak {m['bf16_flops'] / 1e9:.0f} GFLOP/s = {per_cycle['bf16_flops']:.1f} FLOP/cycle/core")
    if args.onnx:
        flop = 2 * model_macs(args.onnx)
        print(
            f"{args.onnx.name}: {flop / 2e9:.2f} GMAC = {flop / 1e9:.2f} GFLOP per image; ceiling "
            f"{m['fp32_flops'] / flop:.1f} img/s at FP32 peak, {m['bf16_flops'] / flop:.1f} img/s at BF16 peak"
        )


if __name__ == "__main__":
    main()
