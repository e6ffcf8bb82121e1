"""``hrnet-triton tune``: NVIDIA's Model Analyzer searches a model's serving config; the winner is written back.

1. The base repository: the variant's ``tensor`` model through the repository writer, with the
   target's options fitted to the smallest max batch of the search (so its warm-ups, preferred and
   CUDA-graph batch sizes hold for every variant Model Analyzer derives; ``tune_config.base_options``).
2. Model Analyzer 1.58 ``profile``, from the tools environment (``make tools-env``): a brute-force
   manual search over instance count × max batch × dynamic batching's queue delay, each config
   measured by perf_analyzer at each concurrency; objective ``perf_throughput`` under the
   constraint ``perf_latency_p95 <= --slo-ms``. Local launch mode: one fresh server per config,
   started through :mod:`hrnet_triton.tune_launch` (docs/tune.md says why not remote mode).
3. The winner (:mod:`hrnet_triton.tune_winner`): the config with the most throughput summed over
   the concurrencies searched, counting only the measurements Model Analyzer marks as satisfying
   the constraint. Its config (from Model Analyzer's output repository) is parsed back
   into :class:`RepositoryOptions` (``options_from_config``); the searched fields become overrides
   of the target's defaults, and ``write_repository`` writes the repository to ``--out``.
4. ``--out`` and the report directory (Model Analyzer's CSVs, HTML reports, its config, the
   logs, checkpoint and ``winner.json``) are each written to a temporary sibling and moved into place.
   The report is kept however the run ends (an error, Ctrl-C, SIGTERM, a failed write-back), before
   the winner is written: ``--resume`` needs its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hrnet_build.config import RepositoryOptions, Target
from hrnet_build.repository import write_repository
from hrnet_core import atomic
from hrnet_core.contract import INPUT_KINDS, model_name
from hrnet_core.variants import Variant

from .tools import Tools
from .tune_config import (
    AnalyzerRun,
    Endpoints,
    Measuring,
    SearchSpace,
    analyzer_config,
    base_options,
    check_paths,
    config_text,
)
from .tune_launch import stop_model_analyzer
from .tune_winner import TuneError, Winner, pick_winner, read_rows

log = logging.getLogger(__name__)

INFERENCE_CSV = "metrics-model-inference.csv"
# Restricted on every server Model Analyzer starts; it and perf_analyzer need model-repository (load/unload) and
# statistics open, and send no admin header. The servers listen on 127.0.0.1 only, for the run; a local user can
# still load a model of theirs through the open load API (docs/tune.md: tune belongs on a single-user machine).
TUNE_RESTRICTED_APIS = ("shared-memory", "trace", "logging")
# The NGC container's server, for --target gpu (the wheel's tritonserver has no TensorRT backend).
NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")


@dataclass(frozen=True)
class TuneResult:
    winner: Winner | None  # None with config_only
    written: list[Path]
    report: Path


@dataclass(frozen=True)
class TuneRequest:
    """What ``tune`` searches and where it writes."""

    variant: Variant
    target: Target
    slo_ms: float
    out: Path  # the repository to write the winner to (replaced as a whole)
    report: Path  # Model Analyzer's report and the run's files
    onnx_dir: Path | None = None
    plans_dir: Path | None = None
    space: SearchSpace | None = None
    measuring: Measuring = Measuring()
    base: RepositoryOptions | None = None  # default: the target's
    kinds: Sequence[str] = INPUT_KINDS
    serve_env: Path | None = None  # cpu/onnx: the python backend's environment
    server_binary: Path | None = None  # gpu/onnx: a full tritonserver install (default: the NGC container's)
    config_only: bool = False
    gpu_memory_mb: float | None = None  # gpu target: Model Analyzer's gpu_used_memory constraint
    resume: Path | None = None  # an earlier report of the same search: its measurements are reused

    @property
    def search(self) -> SearchSpace:
        return self.space or SearchSpace.for_target(self.target)


def run_from_args(args) -> TuneResult:
    """``hrnet-triton tune``'s options -> :func:`tune`."""
    from hrnet_core import variants

    from .server import sigterm_as_interrupt
    from .tools import Tools, default_tools_env, find_tools
    from .tune_options import endpoints, measuring, resumed_ports, search_space

    target = Target(args.target)
    request = TuneRequest(
        variant=variants.get(args.variant),
        target=target,
        slo_ms=args.slo_ms,
        out=args.out,
        report=args.report,
        onnx_dir=args.onnx_dir,
        plans_dir=args.plans_dir,
        space=search_space(args, SearchSpace.for_target(target)),
        measuring=measuring(args),
        kinds=args.inputs,
        serve_env=args.serve_env,
        server_binary=args.triton_server,
        config_only=args.config_only,
        gpu_memory_mb=args.gpu_memory_mb,
        resume=args.resume,
    )
    # --config-only writes the config for another machine: this one need not have the tools
    tools = Tools(args.tools_env or default_tools_env()) if args.config_only else find_tools(args.tools_env)
    ports = args.ports or (resumed_ports(args.resume) if args.resume else None)
    if not args.config_only:
        sigterm_as_interrupt()  # SIGTERM ends a run as Ctrl-C does: Model Analyzer stopped, its files kept
    return tune(request, tools, endpoints(ports))


def tune(request: TuneRequest, tools: Tools, endpoints: Endpoints) -> TuneResult:
    """Run Model Analyzer's search for ``request`` and write its winner; see the module docstring."""
    r = request
    check_paths(r.out, r.report)
    if r.target is Target.GPU and r.plans_dir is None and not r.config_only:
        raise TuneError("--target gpu needs --plans-dir (the plans `hrnet-triton engine` built)")
    if r.target is not Target.GPU and r.onnx_dir is None:
        raise TuneError(f"--target {r.target.value} needs --onnx-dir (the exported {r.variant.name}.onnx)")
    if r.config_only:  # the config names the report directory, where everything it needs is kept
        with atomic.atomic_path(r.report) as tmp:
            tmp.mkdir()
            _prepare(r, tools, endpoints, tmp, named=r.report)
        return TuneResult(None, [], r.report)
    with tempfile.TemporaryDirectory(prefix="hrnet-tune-") as tmp:
        work = Path(tmp)
        run = _prepare(r, tools, endpoints, work)
        _resume(r, work)
        return search_and_write(r, work, run, lambda: _run_model_analyzer(tools, work))


def search_and_write(r: TuneRequest, work: Path, run: AnalyzerRun, search: Callable[[], None]) -> TuneResult:
    """``search()`` (Model Analyzer's run), its winner, and the write-back. Model Analyzer's files are moved to
    ``--report`` however this ends, and before the write-back: its checkpoint is what ``--resume`` needs."""
    winner = None
    try:
        search()
        winner = choose_winner(work / "report" / "results" / INFERENCE_CSV, work / "output_model_repository", r)
    except TuneError as err:
        raise TuneError(f"{err}\n(Model Analyzer's files and logs are kept in {r.report})") from err
    except BaseException:  # Ctrl-C, SIGTERM or a bug: say where the measurements are, then let it go on
        log.error("tune stopped; Model Analyzer's files so far are kept in %s (`--resume %s` goes on)", *[r.report] * 2)
        raise
    finally:
        _keep_report(work, run, r.report, winner)
    try:
        written = _write_winner(r, winner)
    except BaseException:
        log.error("the winner was not written to %s; its measurements and winner.json are kept in %s", r.out, r.report)
        raise
    return TuneResult(winner, written, r.report)


def _prepare(r: TuneRequest, tools: Tools, endpoints: Endpoints, work: Path, named: Path | None = None) -> AnalyzerRun:
    """The base repository, the launcher and Model Analyzer's config, under ``work``; the config names
    ``named`` (default ``work``) as their directory."""
    named = named or work
    _check_plans(r)
    repository = work / "repository"
    write_repository(
        r.target,
        [r.variant],
        repository,
        base_options(r.target, r.search, r.base),
        onnx_dir=r.onnx_dir,
        plans_dir=r.plans_dir,
        kinds=("tensor",),
    )
    launcher, flags = _server(r, work, endpoints)
    run = AnalyzerRun(
        model=model_name(r.variant.name, "tensor"),
        target=r.target,
        slo_ms=r.slo_ms,
        repository=named / "repository",
        work=named,
        report=named / "report",
        launcher=named / launcher.name if launcher.parent == work else launcher,
        perf_analyzer=tools.perf_analyzer if tools.perf_analyzer.exists() else Path("perf_analyzer"),
        endpoints=endpoints,
        server_flags=flags,
        measuring=r.measuring,
        gpu_memory_mb=r.gpu_memory_mb,
    )
    atomic.write_text(work / "model_analyzer.yaml", config_text(analyzer_config(run, r.search)))
    return run


def _resume(r: TuneRequest, work: Path) -> None:
    """Start from an earlier run's checkpoint: Model Analyzer skips every config × concurrency it has measured
    (on the same ports: :func:`resumed_ports`)."""
    if r.resume is None:
        return
    saved = sorted((r.resume / "checkpoints").glob("*.ckpt"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
    if not saved:
        raise TuneError(f"{r.resume} holds no Model Analyzer checkpoint (checkpoints/*.ckpt); name a --report of tune")
    (work / "checkpoints").mkdir(exist_ok=True)
    shutil.copy2(saved[-1], work / "checkpoints" / "0.ckpt")  # the newest; Model Analyzer loads the highest number


def _check_plans(r: TuneRequest) -> None:
    """gpu target: every searched max batch must fit the plans' optimisation profile, or its variant cannot load."""
    if r.target is not Target.GPU or r.plans_dir is None:
        return
    from hrnet_build.repository import collect_plans

    plans = collect_plans(r.plans_dir, r.variant)
    profile_max = min((m.profile.max for _, m in plans.values()), default=None)
    if profile_max is not None and max(r.search.max_batch_sizes) > profile_max:
        raise TuneError(
            f"the search's max batches {r.search.max_batch_sizes} exceed the {r.variant.name} plans' profile (max "
            f"{profile_max}); pass --max-batch values <= {profile_max}, or rebuild them with `engine --max-batch`"
        )


def _server(r: TuneRequest, work: Path, endpoints: Endpoints) -> tuple[Path, dict[str, str]]:
    """The ``triton_server_path`` Model Analyzer starts, and the flags it passes besides ports and repository."""
    flags = {
        "http-address": "127.0.0.1",
        "grpc-address": "127.0.0.1",
        "metrics-address": "127.0.0.1",
        "allow-cpu-metrics": "true",
        "exit-timeout-secs": "3",
        **_restricted_api_flags(),
    }
    if r.target is not Target.CPU or r.server_binary is not None:  # the wheel has only the python backend
        binary = r.server_binary or NGC_TRITONSERVER
        if not binary.exists() and not r.config_only:
            raise TuneError(
                f"{binary}: no tritonserver there. --target {r.target.value} runs in NVIDIA's Triton container "
                "(nvcr.io/nvidia/tritonserver:24.10-py3) or with --triton-server PATH; --config-only writes the "
                "Model Analyzer config without running it"
            )
        return binary, flags
    from .server import default_serve_env

    launcher = work / "tritonserver"
    serve_env = r.serve_env or default_serve_env()
    launcher.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m hrnet_triton.tune_launch --serve-env "{serve_env}" -- "$@"\n'
    )
    launcher.chmod(0o755)
    return launcher, flags


def _restricted_api_flags() -> dict[str, str]:
    """``serve``'s admin-key flags with a random per-run key, on TUNE_RESTRICTED_APIS, for every server tune starts."""
    from .server import lockdown_args

    flags = {}
    for arg in lockdown_args(os.urandom(18).hex()):  # the same key syntax as `serve`, on fewer APIs
        name, value = arg.removeprefix("--").split("=", 1)
        flags[name] = ",".join(TUNE_RESTRICTED_APIS) + ":" + value.split(":", 1)[1]
    return flags


def _run_model_analyzer(tools: Tools, work: Path) -> None:
    """``model-analyzer profile -f model_analyzer.yaml`` in ``work``, its output in ``model_analyzer.log``.

    It runs in a session of its own (a terminal's Ctrl-C reaches only tune); on any exception here, Ctrl-C and
    SIGTERM included, :func:`stop_model_analyzer` stops it and the server it started.
    """
    cmd = [str(tools.model_analyzer), "profile", "-f", str(work / "model_analyzer.yaml")]
    log.info("running %s (its log: model_analyzer.log in the report)", " ".join(cmd))
    with open(work / "model_analyzer.log", "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=work, env=tools.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait()
        except BaseException:
            stop_model_analyzer(proc)
            raise
    if code != 0:
        tail = (work / "model_analyzer.log").read_text(errors="replace").strip().splitlines()[-15:]
        raise TuneError(f"model-analyzer profile exited with code {code}; its last lines:\n" + "\n".join(tail))


def choose_winner(csv_path: Path, variants_dir: Path, r: TuneRequest) -> Winner:
    """The config with the most throughput within the SLO over the concurrencies searched (``tune_winner``)."""
    return pick_winner(read_rows(csv_path), variants_dir, r.slo_ms, r.base or RepositoryOptions.for_target(r.target))


def _write_winner(r: TuneRequest, winner: Winner) -> list[Path]:
    """The repository with the winner's options, through the repository writer, moved into place whole."""
    with atomic.atomic_path(r.out) as tmp:
        written = write_repository(
            r.target,
            [r.variant],
            tmp,
            winner.options,
            onnx_dir=r.onnx_dir,
            plans_dir=r.plans_dir,
            fit_to_plans=False,
            kinds=r.kinds,
        )
    return [r.out / p.name for p in written]


def _keep_report(work: Path, run: AnalyzerRun, dest: Path, winner: Winner | None) -> Path:
    """Model Analyzer's export directory, its config, output repository, logs and ``winner.json``, moved to ``dest``."""
    with atomic.atomic_path(dest) as tmp:
        tmp.mkdir()
        if run.report.is_dir():
            shutil.copytree(run.report, tmp, dirs_exist_ok=True)
        for name in ("model_analyzer.yaml", "model_analyzer.log", "tritonserver.log", "perf_analyzer.log"):
            if (work / name).is_file():
                shutil.copy2(work / name, tmp / name)
        if (work / "checkpoints").is_dir():
            shutil.copytree(work / "checkpoints", tmp / "checkpoints")
        for config in sorted((work / "output_model_repository").glob("*/config.pbtxt")):
            (tmp / "configs" / config.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(config, tmp / "configs" / config.parent.name / "config.pbtxt")  # not the model files
        if winner is not None:
            (tmp / "winner.json").write_text(json.dumps(winner.summary(), indent=2) + "\n")
    return dest
