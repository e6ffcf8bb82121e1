"""The winner of a Model Analyzer search: read its inference table, rank the configs, name the one to write.

A config is ranked by its throughput **summed over the concurrencies searched**, each measurement
counting only where Model Analyzer marks it ``Satisfies Constraints: Yes`` (p95 within the SLO).
That ranks configs by how they serve at every load searched, not at their best one. Measured on
this project's 2-core machine (docs/tune.md): a config with a 2 ms queue delay had the single best
measurement, 18.1 infer/s at concurrency 4, by merging requests into batches, and served half as
much at concurrency 2 (9.2), where two requests became one batch on one instance while the other
instance idled. Ties go to the lower worst p95.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hrnet_build.config import RepositoryOptions, options_from_config, parse_config
from hrnet_core.errors import HrnetTritonError

THROUGHPUT, P95, CONFIG = "Throughput (infer/sec)", "p95 Latency (ms)", "Model Config Path"


class TuneError(HrnetTritonError):
    """Model Analyzer failed, or found no config within the SLO."""


@dataclass(frozen=True)
class Winner:
    """The chosen config: Model Analyzer's name for it, its measurements, and the options it becomes."""

    variant_name: str  # Model Analyzer's name for the config, e.g. HRNet_W18_C_config_3
    rows: list[dict[str, str]]  # its measurements, one per concurrency, as Model Analyzer's CSV has them
    options: RepositoryOptions
    score: float  # infer/s summed over the concurrencies where p95 met the SLO

    @property
    def row(self) -> dict[str, str]:
        """Its best measurement within the SLO."""
        return max(_passing(self.rows), key=lambda x: float(x[THROUGHPUT]))

    def summary(self) -> dict:
        o = self.options
        return {
            "model_analyzer_config": self.variant_name,
            "instances": o.instances,
            "max_batch_size": o.max_batch_size,
            "max_queue_delay_us": o.max_queue_delay_us,
            "score_infer_per_s_summed_within_slo": round(self.score, 3),
            "measured": self.rows,
        }


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """Model Analyzer's inference table, one dict per measurement (config × concurrency)."""
    if not csv_path.is_file():
        raise TuneError(f"Model Analyzer wrote no {csv_path.name} (no config could be measured); see its log")
    with open(csv_path, newline="") as fh:
        return [{k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]


def _passing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [row for row in rows if row.get("Satisfies Constraints") == "Yes"]


def pick_winner(rows: list[dict[str, str]], variants_dir: Path, slo_ms: float, base: RepositoryOptions) -> Winner:
    """The best-ranked config (module docstring), as overrides of ``base``: instances, max batch, queue delay."""
    if not _passing(rows):
        best = min((float(row[P95]) for row in rows), default=float("nan"))
        raise TuneError(
            f"none of the {len(rows)} measurements kept p95 latency within {slo_ms:g} ms (the best p95 was "
            f"{best:.0f} ms); raise --slo-ms or search lower concurrency (--concurrency)"
        )
    by_config: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_config.setdefault(row[CONFIG], []).append(row)

    def rank(name: str) -> tuple[float, float]:
        passing = _passing(by_config[name])
        return sum(float(r[THROUGHPUT]) for r in passing), -max(float(r[P95]) for r in passing)

    name = max((n for n in by_config if _passing(by_config[n])), key=rank)
    config = variants_dir / name / "config.pbtxt"
    if not config.is_file():
        raise TuneError(f"Model Analyzer measured {name} but its {config} is missing")
    measured = options_from_config(parse_config(config.read_text()))
    options = dataclasses.replace(
        base.override(max_batch=measured.max_batch_size, instances=measured.instances),
        max_queue_delay_us=measured.max_queue_delay_us,
    )
    return Winner(name, by_config[name], options, rank(name)[0])
