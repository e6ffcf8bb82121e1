"""``bench.png``: throughput against latency, perf_analyzer and Locust on one figure.

Left, the closed loop (concurrency); right, perf_analyzer's open loop (request rate), when it
ran. Latency is on a log axis, so that batch 1's hundreds of milliseconds and batch 8's seconds
both read. One colour per input and batch size; the line style tells the tool (solid
perf_analyzer, dashed Locust) and the marker the percentile (circle p50, triangle p99; p90 and
p95 are in the table). Each p50 point is labelled with its load (Locust's in italics), moved
until it overlaps no other label. ``--slo-ms`` draws the latency objective as a red line.
"""

from __future__ import annotations

from pathlib import Path

from hrnet_core import atomic
from hrnet_triton.bench import Point

TOOL_STYLE = {"perf_analyzer": "-", "locust": "--"}
PERCENTILE_MARKER = {"p50_ms": "o", "p99_ms": "^"}
LABEL_OFFSETS = [(5, -11), (5, 5), (-28, -11), (-28, 5), (5, -22), (5, 16), (-28, -22), (-28, 16)]


def _groups(points: list[Point]) -> list[tuple[str, int]]:
    return sorted({(p.input, p.batch_size) for p in points}, key=lambda g: (g[0], g[1]))


def _draw(ax, points: list[Point], colours: dict, mode: str) -> list:
    """One panel's lines; returns the load labels it placed."""
    labels = []
    for (kind, batch), colour in colours.items():
        for tool, style in TOOL_STYLE.items():
            row = [p for p in points if (p.input, p.batch_size, p.tool, p.mode) == (kind, batch, tool, mode)]
            row = sorted((p for p in row if p.images_per_s and p.p50_ms), key=lambda p: p.concurrency or p.request_rate)
            for attr, marker in PERCENTILE_MARKER.items():
                ys = [getattr(p, attr) for p in row]
                width = 1.6 if attr == "p50_ms" else 0.9
                ax.plot([p.images_per_s for p in row], ys, style, marker=marker, color=colour, lw=width, ms=5)
            for p in row:
                text = f"c={p.concurrency}" if mode == "concurrency" else f"{p.request_rate:g}/s"
                labels.append(
                    ax.annotate(
                        text,
                        (p.images_per_s, p.p50_ms),
                        textcoords="offset points",
                        xytext=LABEL_OFFSETS[0],
                        fontsize=7,
                        color=colour,
                    )  # fmt: skip
                )
    return labels


def _unoverlap(fig, labels: list) -> None:
    """Move each label to the first offset where it overlaps no label placed before it."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for label in labels:
        for offset in LABEL_OFFSETS:
            label.xyann = offset
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(label.get_window_extent(renderer))


def _axis(ax, heading: str, slo_ms: float | None) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.margins(x=0.08, y=0.08)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    if slo_ms:
        ax.axhline(slo_ms, color="red", ls=":", lw=1.2)
        ax.annotate(
            f"SLO {slo_ms:g} ms", (1, slo_ms), xycoords=("axes fraction", "data"), xytext=(-4, 3),
            textcoords="offset points", ha="right", fontsize=7, color="red",
        )  # fmt: skip
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency per request (ms, log scale)")
    ax.set_title(heading, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)


def _legend(fig, colours: dict) -> None:
    from matplotlib.lines import Line2D

    several_inputs = len({kind for kind, _ in colours}) > 1
    handles = [
        Line2D([], [], color=c, lw=6, label=f"{kind}, batch {b}" if several_inputs else f"batch {b}")
        for (kind, b), c in colours.items()
    ]
    handles += [Line2D([], [], color="black", ls=s, label=t) for t, s in TOOL_STYLE.items()]
    handles += [Line2D([], [], color="black", ls="", marker=m, label=a[:3]) for a, m in PERCENTILE_MARKER.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def plot(points: list[Point], path: Path, title: str, slo_ms: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(_groups(points))}
    open_loop = any(p.mode == "rate" and p.images_per_s for p in points)
    fig, axes = plt.subplots(1, 2 if open_loop else 1, figsize=(13 if open_loop else 8, 5.8), squeeze=False)
    panels = [("closed loop: concurrency (c=)", "concurrency")]
    if open_loop:
        panels.append(("open loop: perf_analyzer at a request rate (req/s)", "rate"))
    labels = []
    for ax, (heading, mode) in zip(axes[0], panels):
        labels += _draw(ax, points, colours, mode)
        _axis(ax, heading, slo_ms)
    fig.suptitle(title, fontsize=9)
    _legend(fig, colours)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _unoverlap(fig, labels)
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
