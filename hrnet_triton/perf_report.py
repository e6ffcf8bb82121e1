"""``hrnet-triton bench``'s outputs: ``bench.csv``, ``bench.json``, ``bench.md`` (and the plot, :mod:`perf_plot`).

All are written atomically. ``bench.md`` holds how the run was made (:func:`run_context`), one table
per tool and loop (perf_analyzer's closed and open loop, Locust's closed loop), and the side-by-side
comparison (:func:`compare`): Locust against perf_analyzer at the same input, batch size and
concurrency, throughput within 10% and p50 within 10% plus half of Locust's rounding step.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from hrnet_core import atomic
from hrnet_triton.bench import BenchConfig, Point, locust_step_ms

AGREEMENT = 0.10  # the goal: Locust within 10% of perf_analyzer


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the reports' machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_context(cfg: BenchConfig, server: dict[str, str], perf_analyzer_version: str | None) -> dict[str, str]:
    """Where, when and how the sweep ran: for the title, the table's header and ``bench.json``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        locust_version = version("locust")
    except PackageNotFoundError:
        locust_version = "not installed"
    load = os.getloadavg()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "hrnet-triton " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "(called from Python)",
        "server": cfg.url,
        "protocol": cfg.protocol,
        "model": cfg.model,
        "target": server["target"],
        "runtime": server["runtime"],
        "triton_version": server["triton_version"],
        "perf_analyzer": perf_analyzer_version or "not used",
        "locust": locust_version if "locust" in cfg.tools else "not used",
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "load_average_at_start": " ".join(f"{x:.2f}" for x in load),
    }


def title(ctx: dict[str, str]) -> str:
    return (
        f"{ctx['model']}, {ctx['target']} target, {ctx['runtime']}; Triton {ctx['triton_version']} at {ctx['server']} "
        f"over {ctx['protocol'].upper()}\n{ctx['perf_analyzer']}; Locust {ctx['locust']}; {ctx['date']}"
    )


@dataclass(frozen=True)
class Comparison:
    input: str
    batch_size: int
    concurrency: int
    perf_images_per_s: float
    locust_images_per_s: float
    throughput_ratio: float  # Locust / perf_analyzer
    perf_p50_ms: float
    locust_p50_ms: float
    locust_step_ms: float  # Locust's rounding step at its p50
    p50_ratio: float
    agree: bool
    why: str  # what is known to explain a difference


def _per_image_ms(p: Point) -> float | None:
    """The server's inference time per image (a batched execution's time is reported for each of its requests)."""
    return p.server_compute_infer_ms / p.avg_batch if p.server_compute_infer_ms and p.avg_batch else None


def _reasons(ref: Point, lo: Point) -> list[str]:
    """What the measurements show that explains a difference between perf_analyzer (``ref``) and Locust (``lo``)."""
    why = []
    if lo.failures:
        why.append(f"Locust counted {lo.failures} failed requests (not in its throughput)")
    if ref.stable is False:
        why.append("perf_analyzer did not stabilise")
    a, b = _per_image_ms(ref), _per_image_ms(lo)
    if a and b and abs(b / a - 1) > AGREEMENT:
        why.append(
            f"the server's inference took {a:.0f} ms per image during perf_analyzer's run and {b:.0f} ms during "
            f"Locust's ({b / a - 1:+.0%}): the machine's speed changed between the runs"
        )
    local = lo.server_cpu_percent is not None
    if local and (lo.client_cpu_percent or 0) > 1.5 * (ref.client_cpu_percent or 0) + 10:
        why.append(
            f"Locust used {lo.client_cpu_percent:.0f}% CPU against perf_analyzer's {ref.client_cpu_percent:.0f}%, "
            "on the server's machine"
        )
    return why


def compare(points: list[Point]) -> list[Comparison]:
    """Locust against perf_analyzer at every closed-loop point both measured."""
    measured = [p for p in points if p.mode == "concurrency" and p.images_per_s is not None and p.p50_ms]
    pa = {(p.input, p.batch_size, p.concurrency): p for p in measured if p.tool == "perf_analyzer"}
    out = []
    for lo in (p for p in measured if p.tool == "locust"):
        ref = pa.get((lo.input, lo.batch_size, lo.concurrency))
        if ref is None or not ref.images_per_s:
            continue
        step = locust_step_ms(lo.p50_ms)
        tp_ok = abs(lo.images_per_s / ref.images_per_s - 1) <= AGREEMENT
        p50_ok = abs(lo.p50_ms - ref.p50_ms) <= AGREEMENT * ref.p50_ms + step / 2
        why = _reasons(ref, lo)
        if not (tp_ok and p50_ok) and not why:
            why.append("no cause found by bench; the tools run one after the other, and this CPU drifts ±15%")
        out.append(
            Comparison(
                lo.input,
                lo.batch_size,
                lo.concurrency or 0,
                ref.images_per_s,
                lo.images_per_s,
                round(lo.images_per_s / ref.images_per_s, 3),
                ref.p50_ms,
                lo.p50_ms,
                step,
                round(lo.p50_ms / ref.p50_ms, 3),
                tp_ok and p50_ok,
                "; ".join(why),
            )  # fmt: skip
        )
    return out


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _point_table(points: list[Point], mode: str) -> list[str]:
    load = "concurrency" if mode == "concurrency" else "rate req/s"
    head = (
        f"| input | batch | {load} | images/s | requests/s | p50 ms | p90 ms | p95 ms | p99 ms | avg batch | "
        "queue ms | compute input ms | compute infer ms | compute output ms | stable | server CPU % | "
        "client CPU % | GPU % | GPU MiB | failures | note |"
    )
    lines = [head, "|---|" + "---:|" * (head.count("|") - 3) + "---|"]
    for p in points:
        ms = 0 if p.latency_step_ms and p.latency_step_ms >= 1 else 1
        cells = [
            p.input, p.batch_size, p.concurrency if mode == "concurrency" else _fmt(p.request_rate, 2),
            _fmt(p.images_per_s), _fmt(p.requests_per_s, 2),
            *(_fmt(v, ms) for v in (p.p50_ms, p.p90_ms, p.p95_ms, p.p99_ms)),
            _fmt(p.avg_batch, 2), _fmt(p.server_queue_ms), _fmt(p.server_compute_input_ms),
            _fmt(p.server_compute_infer_ms), _fmt(p.server_compute_output_ms), _fmt(p.stable),
            _fmt(p.server_cpu_percent, 0), _fmt(p.client_cpu_percent, 0),
            _fmt(p.gpu_utilization_percent, 0), _fmt(p.gpu_memory_used_mb, 0),
            f"{_fmt(p.failures)}/{_fmt(p.requests)}", p.note.replace("|", "/"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _comparison_table(rows: list[Comparison]) -> list[str]:
    lines = [
        "| input | batch | concurrency | perf_analyzer images/s | Locust images/s | ratio | perf_analyzer p50 ms | "
        "Locust p50 ms (step) | ratio | within 10% | why they differ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c.input} | {c.batch_size} | {c.concurrency} | {c.perf_images_per_s:.1f} | {c.locust_images_per_s:.1f}"
            f" | {c.throughput_ratio:.2f} | {c.perf_p50_ms:.1f} | {c.locust_p50_ms:.0f} (±{c.locust_step_ms / 2:g}) | "
            f"{c.p50_ratio:.2f} | {_fmt(c.agree)} | {c.why} |"
        )
    return lines


def lift_common_notes(points: list[Point]) -> tuple[list[str], list[Point]]:
    """The notes every measured point carries (such as "no GPU metrics"), and the points without them."""
    parts = [set(p.note.split("; ")) - {""} for p in points if p.images_per_s is not None]
    common = sorted(set.intersection(*parts)) if parts else []
    trimmed = [replace(p, note="; ".join(n for n in p.note.split("; ") if n not in common)) for p in points]
    return common, trimmed


def markdown(points: list[Point], ctx: dict[str, str]) -> str:
    """``bench.md``: the run's context, a table per tool and loop, and the comparison."""
    lines = [f"# {title(ctx).splitlines()[0]}", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in ctx.items()] + [""]
    common, points = lift_common_notes(points)
    lines += [f"Every point: {'; '.join(common)}.", ""] if common else []
    sections = [
        ("perf_analyzer, closed loop (concurrency)", "perf_analyzer", "concurrency"),
        ("Locust, closed loop (users)", "locust", "concurrency"),
        ("perf_analyzer, open loop (request rate)", "perf_analyzer", "rate"),
    ]
    for heading, tool, mode in sections:
        chosen = [p for p in points if p.tool == tool and p.mode == mode]
        if chosen:
            lines += [f"## {heading}", "", *_point_table(chosen, mode), ""]
    rows = compare(points)
    if rows:
        lines += ["## Locust against perf_analyzer", ""]
        lines += [
            "Same input, batch and concurrency. Within 10%: throughput within 10%, and p50 within 10% plus half of "
            "Locust's rounding step (Locust keeps whole ms below 100 ms, 10 ms steps below 1 s, 100 ms steps "
            "below 10 s).",
            "",
            *_comparison_table(rows),
            "",
        ]
    return "\n".join(lines)


def _csv_text(points: list[Point]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Point)])
    writer.writeheader()
    writer.writerows(asdict(p) for p in points)
    return buffer.getvalue()


def write_results(points: list[Point], out: Path, ctx: dict[str, str], slo_ms: float | None = None) -> list[Path]:
    """``bench.csv``, ``bench.json``, ``bench.md`` and ``bench.png`` in ``out``, each written atomically."""
    from hrnet_triton.perf_plot import plot

    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "bench.csv", _csv_text(points))
    comparison = [asdict(c) for c in compare(points)]
    atomic.write_json(
        out / "bench.json", {"context": ctx, "points": [asdict(p) for p in points], "comparison": comparison}
    )
    atomic.write_text(out / "bench.md", markdown(points, ctx))
    plot(points, out / "bench.png", title(ctx), slo_ms)
    return [out / name for name in ("bench.csv", "bench.json", "bench.md", "bench.png")]


def bench_and_write(cfg: BenchConfig, out: Path, slo_ms: float | None = None) -> list[Path]:
    """Check the setup, sweep, and write every output; the context records the load average before and after."""
    from hrnet_triton.bench import check, sweep
    from hrnet_triton.perf_server import describe_server

    cfg = check(cfg)
    pa_version = None
    if "perf_analyzer" in cfg.tools:
        from hrnet_triton.tools import find_tools

        pa_version = find_tools().perf_analyzer_version().replace("Perf Analyzer Version", "perf_analyzer").strip()
    ctx = run_context(cfg, describe_server(cfg.url, cfg.model), pa_version)
    points = sweep(cfg)
    ctx["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return write_results(points, out, ctx, slo_ms)
