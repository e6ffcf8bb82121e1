"""Repository stage: write a Triton model repository, one model per seed variant.

Configs are built as ``ModelConfig`` messages of Triton's own protobuf definitions
(``tritonclient.grpc.model_config_pb2``) and written in its text format, so whatever this
module writes is a config Triton can parse. Three targets share tensor names, dims, labels
and the preprocessing contract; they differ in how the model runs:

- ``gpu``: TensorRT plans (``platform: "tensorrt_plan"``, ``KIND_GPU``), CUDA graphs for the
  common batch sizes; ``max_batch_size`` is the plans' optimisation-profile maximum.
- ``onnx``: Triton's ``onnxruntime`` backend on the exported ONNX model (CPU by default;
  set ``--instance-kind gpu`` for a GPU in the NGC container).
- ``cpu``: the embedded default. Triton's ``python`` backend running ONNX Runtime
  (``hrnet_build/triton_python_model.py``), for the ``tritonserver`` binary in the
  ``nvidia-pytriton`` wheel, which has no onnxruntime backend.

Each target's defaults are a :class:`RepositoryOptions` (``RepositoryOptions.for_target``), a
frozen value validated once and passed whole; :func:`options_from_config` reads one back from a
``config.pbtxt``, so generator and parser are checked against each other. The choices are
explained in docs/repository.md.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hrnet_core import atomic, release
from hrnet_core.contract import (
    CHANNELS,
    CROP_SIZE,
    DEFAULT_PREPROCESS,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    PreprocessConfig,
    triton_parameters,
)
from hrnet_core.errors import EngineError, HrnetTritonError
from hrnet_core.labels import imagenet_labels
from hrnet_core.manifest import PlanManifest, manifest_path
from hrnet_core.variants import Variant

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
VERSION = "1"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"
BUILD_SCRIPT = "build/build_plans.sh"


class Target(str, enum.Enum):
    GPU = "gpu"
    ONNX = "onnx"
    CPU = "cpu"


class InstanceKind(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class RepositoryOptions:
    """How one target serves each model: batching, queueing, instances and threads.

    Every field is checked here, once; the rest of the stage trusts it.
    """

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    max_queue_size: int  # requests waiting beyond this are rejected at once (0: unbounded)
    queue_timeout_us: int  # a request that waited this long is rejected
    instances: int
    instance_kind: InstanceKind
    threads: int | None = None  # runtime threads per instance (cpu and onnx targets)
    cuda_graph_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = (*self.preferred_batch_sizes, *self.cuda_graph_batch_sizes)
        if self.max_batch_size < 1 or any(not 1 <= s <= self.max_batch_size for s in sizes):
            raise HrnetTritonError(f"batch sizes {sizes} must lie in 1..max_batch_size={self.max_batch_size}")
        for name, low in (("instances", 1), ("max_queue_size", 0), ("max_queue_delay_us", 0), ("queue_timeout_us", 0)):
            if getattr(self, name) < low:
                raise HrnetTritonError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise HrnetTritonError(f"threads must be at least 1, got {self.threads}")
        object.__setattr__(self, "instance_kind", InstanceKind(self.instance_kind))

    @classmethod
    def for_target(cls, target: Target) -> RepositoryOptions:
        """The target's defaults (docs/repository.md gives the measurements behind them)."""
        return _DEFAULTS[Target(target)]

    def with_max_batch(self, max_batch: int) -> RepositoryOptions:
        """Another ``max_batch_size``; preferred and CUDA-graph sizes above it are dropped."""
        preferred = tuple(s for s in self.preferred_batch_sizes if s <= max_batch)
        return dataclasses.replace(
            self,
            max_batch_size=max_batch,
            preferred_batch_sizes=preferred or ((max_batch,) if self.preferred_batch_sizes else ()),
            cuda_graph_batch_sizes=tuple(s for s in self.cuda_graph_batch_sizes if s <= max_batch),
        )

    def override(
        self,
        *,
        max_batch: int | None = None,
        instances: int | None = None,
        max_queue_size: int | None = None,
        threads: int | None = None,
        instance_kind: str | None = None,
    ) -> RepositoryOptions:
        """These options with the given fields changed (None keeps a field); validated again."""
        out = self if max_batch is None else self.with_max_batch(max_batch)
        changes = {"instances": instances, "max_queue_size": max_queue_size, "threads": threads}
        changes["instance_kind"] = instance_kind
        return dataclasses.replace(out, **{k: v for k, v in changes.items() if v is not None})


_DEFAULTS: dict[Target, RepositoryOptions] = {
    # T4/V100: batch 8 costs 1.4-5.5x batch 1 for 8x the images, and a 1 ms window is small
    # against 6-40 ms of compute (seed table; docs/repository.md). Two instances overlap
    # copies with compute.
    Target.GPU: RepositoryOptions(
        32, (8, 16, 32), 1000, 256, 2_000_000, 2, InstanceKind.GPU, cuda_graph_batch_sizes=(1, 8, 16, 32)
    ),
    # ONNX Runtime on CPU gains little from big batches; 8 keeps latency bounded.
    Target.ONNX: RepositoryOptions(16, (4, 8), 2000, 64, 5_000_000, 1, InstanceKind.CPU),
    # The embedded default on a 2-core machine: two instances of one ONNX Runtime thread each
    # beat one instance of two threads (HRNet's many small low-resolution ops scale poorly
    # across threads), and no preferred sizes or delay: an instance takes whatever is waiting
    # when it frees up, instead of merging two concurrent requests onto one instance while the
    # other idles (measured in docs/repository.md).
    Target.CPU: RepositoryOptions(8, (), 0, 32, 5_000_000, 2, InstanceKind.CPU, threads=1),
}


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise HrnetTritonError("writing Triton configs needs tritonclient: pip install 'hrnet-triton[client]'") from err
    return model_config_pb2


# -- generator: options -> ModelConfig ------------------------------------------------------------


def model_config(
    variant: Variant,
    target: Target,
    options: RepositoryOptions | None = None,
    *,
    preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
    cc_model_filenames: dict[str, str] | None = None,
):
    """The ``ModelConfig`` message for ``variant`` on ``target`` (``options``: the target's defaults).

    For ``gpu``, ``cc_model_filenames`` maps compute capabilities ("7.5") to plan files in the
    version directory.
    """
    pb = _pb()
    o = options or RepositoryOptions.for_target(target)
    cfg = pb.ModelConfig(name=variant.name, max_batch_size=o.max_batch_size)
    _set_runtime(cfg, target, cc_model_filenames)
    cfg.input.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=[CHANNELS, CROP_SIZE, CROP_SIZE])
    cfg.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[NUM_CLASSES], label_filename=LABELS_FILE)
    _set_batching(cfg, o)
    kind = pb.ModelInstanceGroup.KIND_GPU if o.instance_kind is InstanceKind.GPU else pb.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=o.instances, kind=kind)
    cfg.version_policy.latest.num_versions = 1
    if o.cuda_graph_batch_sizes:
        cfg.optimization.cuda.graphs = True
        for size in o.cuda_graph_batch_sizes:
            cfg.optimization.cuda.graph_spec.add(batch_size=size)
    for size in sorted({1, o.max_batch_size}):
        warm = cfg.model_warmup.add(name=f"random_batch_{size}", batch_size=size)
        warm.inputs[INPUT_NAME].data_type = pb.TYPE_FP32
        warm.inputs[INPUT_NAME].dims.extend([CHANNELS, CROP_SIZE, CROP_SIZE])
        warm.inputs[INPUT_NAME].random_data = True
    params = {"variant": variant.name, **preprocess.to_parameters(), **_thread_parameters(target, o.threads)}
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def _set_runtime(cfg, target: Target, cc_model_filenames: dict[str, str] | None) -> None:
    if target is Target.GPU:
        cfg.platform = "tensorrt_plan"
        for cc, filename in sorted((cc_model_filenames or {}).items()):
            cfg.cc_model_filenames[cc] = filename
        cfg.default_model_filename = PLAN_FILE
        if cc_model_filenames:
            newest = max(cc_model_filenames, key=lambda cc: tuple(int(x) for x in cc.split(".")))
            cfg.default_model_filename = cc_model_filenames[newest]
    elif target is Target.ONNX:
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = ONNX_FILE
    else:
        cfg.backend = "python"


def _set_batching(cfg, o: RepositoryOptions) -> None:
    pb = _pb()
    db = cfg.dynamic_batching
    db.preferred_batch_size.extend(o.preferred_batch_sizes)
    db.max_queue_delay_microseconds = o.max_queue_delay_us
    policy = db.default_queue_policy
    policy.timeout_action = pb.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = o.queue_timeout_us
    policy.allow_timeout_override = True
    policy.max_queue_size = o.max_queue_size


# The parameter each runtime reads its thread count from. Triton's onnxruntime backend reads
# intra_op_thread_count; without it ONNX Runtime starts a thread per core of the machine, which
# in a container is the node's cores, not the pod's CPU limit.
_THREADS_PARAMETER = {Target.CPU: "onnx_intra_op_threads", Target.ONNX: "intra_op_thread_count"}


def _thread_parameters(target: Target, threads: int | None) -> dict[str, str]:
    key = _THREADS_PARAMETER.get(target)
    return {key: str(threads)} if key and threads is not None else {}


# -- parser: config.pbtxt -> ModelConfig -> options -----------------------------------------------


def config_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse ``config.pbtxt`` text with Triton's protobuf definitions."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


def target_of(cfg) -> Target:
    if cfg.platform == "tensorrt_plan":
        return Target.GPU
    return Target.ONNX if cfg.backend == "onnxruntime" else Target.CPU


def options_from_config(cfg) -> RepositoryOptions:
    """The :class:`RepositoryOptions` a ``ModelConfig`` was written from (the inverse of :func:`model_config`)."""
    pb = _pb()
    db, group = cfg.dynamic_batching, cfg.instance_group[0]
    threads = triton_parameters(cfg).get(_THREADS_PARAMETER.get(target_of(cfg), ""))
    return RepositoryOptions(
        max_batch_size=cfg.max_batch_size,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_delay_us=db.max_queue_delay_microseconds,
        max_queue_size=db.default_queue_policy.max_queue_size,
        queue_timeout_us=db.default_queue_policy.default_timeout_microseconds,
        instances=group.count,
        instance_kind=InstanceKind.GPU if group.kind == pb.ModelInstanceGroup.KIND_GPU else InstanceKind.CPU,
        threads=int(threads) if threads else None,
        cuda_graph_batch_sizes=tuple(g.batch_size for g in cfg.optimization.cuda.graph_spec),
    )


# -- plans built by the engine stage --------------------------------------------------------------


def installed_plan_name(cc: str) -> str:
    """``7.5`` -> ``model_cc75.plan``: one file per architecture in a model's version directory."""
    return f"model_cc{cc.replace('.', '')}.plan"


def check_plan_manifest(m: PlanManifest, pinned: str = release.TENSORRT_VERSION) -> None:
    """Refuse a plan built with another TensorRT version than the pinned release's."""
    if m.tensorrt_version != pinned:
        raise EngineError(
            f"{m.plan_file} was built with TensorRT {m.tensorrt_version}, but the pinned Triton release "
            f'{release.NGC_RELEASE} runs TensorRT {pinned}. Triton would refuse it with "engine plan file is not '
            f'compatible" (plans are tied to the exact TensorRT version). Rebuild it with `bash {BUILD_SCRIPT}`, '
            f"which uses {release.TENSORRT_IMAGE}."
        )


def collect_plans(plans_dir: Path, variant: Variant) -> dict[str, tuple[Path, PlanManifest]]:
    """The checked plans for ``variant`` in ``plans_dir``, keyed by compute capability."""
    found: dict[str, tuple[Path, PlanManifest]] = {}
    for manifest_file in sorted(plans_dir.glob("*.plan.json")):
        m = PlanManifest.read(manifest_file)
        if m.variant != variant.name:
            continue
        check_plan_manifest(m)
        plan = manifest_file.with_name(manifest_file.name.removesuffix(".json"))
        if not plan.is_file() or manifest_path(plan) != manifest_file:
            raise EngineError(f"{manifest_file} describes {plan.name}, which is missing")
        if m.compute_capability in found:
            raise EngineError(
                f"two plans for {variant.name} on compute capability {m.compute_capability}: "
                f"{found[m.compute_capability][0].name} and {plan.name}"
            )
        found[m.compute_capability] = (plan, m)
    return found


def _fit_to_plans(options: RepositoryOptions, variant: Variant, profile_max: int, fit: bool) -> RepositoryOptions:
    """With ``fit``, a max batch above the plans' profile shrinks to it; otherwise it is an error."""
    if options.max_batch_size <= profile_max:
        return options
    if fit:
        return options.with_max_batch(profile_max)
    raise HrnetTritonError(
        f"--max-batch {options.max_batch_size} is above the optimisation profile of the {variant.name} plans (max "
        f"{profile_max}); Triton would send batches the plans cannot run. Use --max-batch <= {profile_max}, "
        "or rebuild the plans with `hrnet-triton engine --max-batch N`"
    )


# -- writing --------------------------------------------------------------------------------------


def write_model(
    variant: Variant,
    target: Target,
    out: Path,
    options: RepositoryOptions | None = None,
    *,
    onnx: Path | None = None,
    plans_dir: Path | None = None,
    fit_to_plans: bool = True,
) -> Path:
    """Write one model directory (config, labels, and its version directory) under ``out``.

    For the gpu target, ``max_batch_size`` may not exceed the plans' optimisation profile: with
    ``fit_to_plans`` (when the user did not choose a max batch) it is lowered to the profile's.
    """
    options = options or RepositoryOptions.for_target(target)
    plans = collect_plans(plans_dir, variant) if (target is Target.GPU and plans_dir is not None) else {}
    if target is Target.GPU and plans_dir is not None and not plans:
        raise HrnetTritonError(f"{plans_dir}: no plans for {variant.name}; build them with `hrnet-triton engine`")
    if plans:
        options = _fit_to_plans(options, variant, min(m.profile.max for _, m in plans.values()), fit_to_plans)
    if target is not Target.GPU and onnx is not None and not onnx.is_file():
        raise HrnetTritonError(f"{onnx}: no such ONNX model; create it with `hrnet-triton export {variant.name}`")
    cc_files = {cc: installed_plan_name(cc) for cc in plans}
    cfg = model_config(variant, target, options, cc_model_filenames=cc_files or None)
    model_dir = out / variant.name
    atomic.write_text(model_dir / "config.pbtxt", config_text(cfg))
    labels = imagenet_labels()
    atomic.write_text(model_dir / LABELS_FILE, "".join(f"{labels[i]}\n" for i in range(len(labels))))
    version = model_dir / VERSION
    for cc, (plan, _) in plans.items():
        with atomic.atomic_path(version / cc_files[cc], ".plan") as tmp:
            shutil.copyfile(plan, tmp)
    if target is Target.CPU:
        source = resources.files("hrnet_build").joinpath("triton_python_model.py").read_text("utf-8")
        atomic.write_text(version / PYTHON_MODEL_FILE, source)
    if target is not Target.GPU and onnx is not None:
        with atomic.atomic_path(version / ONNX_FILE, ".onnx") as tmp:
            shutil.copyfile(onnx, tmp)
    return model_dir


def write_repository(
    target: Target,
    variants: Sequence[Variant],
    out: str | os.PathLike[str],
    options: RepositoryOptions | None = None,
    *,
    onnx_dir: Path | None = None,
    plans_dir: Path | None = None,
    fit_to_plans: bool = True,
) -> list[Path]:
    """Write a repository for ``variants``; ONNX models are taken from ``onnx_dir/<name>.onnx``,
    plans (gpu target) from ``plans_dir`` (any ``*.plan`` with its ``*.plan.json`` manifest)."""
    written = []
    for v in variants:
        onnx = onnx_dir / f"{v.name}.onnx" if onnx_dir is not None else None
        model = write_model(
            v, Target(target), Path(out), options, onnx=onnx, plans_dir=plans_dir, fit_to_plans=fit_to_plans
        )
        written.append(model)
        log.info("wrote %s (%s target)", written[-1], Target(target).value)
    return written
