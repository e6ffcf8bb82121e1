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

Batching choices per target are in ``TARGETS`` and explained in docs/repository.md.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from hrnet_triton import atomic
from hrnet_triton.contract import (
    CHANNELS, CROP_SIZE, DEFAULT_PREPROCESS, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME, PreprocessConfig, imagenet_labels,
)  # fmt: skip
from hrnet_triton.errors import HrnetTritonError
from hrnet_triton.variants import Variant

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
VERSION = "1"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"


class Target(str, enum.Enum):
    GPU = "gpu"
    ONNX = "onnx"
    CPU = "cpu"


@dataclass(frozen=True)
class Batching:
    """Dynamic batching and queueing for one target."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    max_queue_size: int  # requests waiting beyond this are rejected at once
    queue_timeout_us: int  # a request that waited this long is rejected
    instances: int
    cuda_graph_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = (*self.preferred_batch_sizes, *self.cuda_graph_batch_sizes)
        if self.max_batch_size < 1 or any(not 1 <= s <= self.max_batch_size for s in sizes):
            raise ValueError(f"batch sizes {sizes} must lie in 1..max_batch_size={self.max_batch_size}")


TARGETS: dict[Target, Batching] = {
    # T4/V100: batch 8 costs 1.4-5.5x batch 1 for 8x the images, and a 1 ms window is small
    # against 6-40 ms of compute (seed table; docs/repository.md). Two instances overlap
    # copies with compute.
    Target.GPU: Batching(32, (8, 16, 32), 1000, 256, 2_000_000, 2, cuda_graph_batch_sizes=(1, 8, 16, 32)),
    # ONNX Runtime on CPU gains little from big batches; 8 keeps latency bounded.
    Target.ONNX: Batching(16, (4, 8), 2000, 64, 5_000_000, 1),
    # The embedded default on a 2-core machine: two instances of one ONNX Runtime thread each
    # beat one instance of two threads (HRNet's many small low-resolution ops scale poorly
    # across threads), and no preferred sizes or delay: an instance takes whatever is waiting
    # when it frees up, instead of merging two concurrent requests onto one instance while the
    # other idles (measured in docs/repository.md).
    Target.CPU: Batching(8, (), 0, 32, 5_000_000, 2),
}


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise HrnetTritonError(
            "writing Triton configs needs tritonclient: pip install 'hrnet-triton[client]'"
        ) from err
    return model_config_pb2


def model_config(
    variant: Variant,
    target: Target,
    *,
    threads: int | None = None,
    instance_kind: str | None = None,
    preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
    max_batch_size: int | None = None,
    cc_model_filenames: dict[str, str] | None = None,
    max_queue_size: int | None = None,
    instances: int | None = None,
):
    """The ``ModelConfig`` message for ``variant`` on ``target``.

    For ``gpu``, ``max_batch_size`` is the plans' profile maximum and ``cc_model_filenames``
    maps compute capabilities ("7.5") to plan files in the version directory.
    """
    pb = _pb()
    b = TARGETS[target]
    if max_batch_size is not None and max_batch_size != b.max_batch_size:
        b = replace(
            b,
            max_batch_size=max_batch_size,
            preferred_batch_sizes=tuple(s for s in b.preferred_batch_sizes if s <= max_batch_size)
            or ((max_batch_size,) if b.preferred_batch_sizes else ()),
            cuda_graph_batch_sizes=tuple(s for s in b.cuda_graph_batch_sizes if s <= max_batch_size),
        )
    if max_queue_size is not None:
        if max_queue_size < 0:
            raise HrnetTritonError(f"--max-queue-size must be >= 0 (0: unbounded), got {max_queue_size}")
        b = replace(b, max_queue_size=max_queue_size)
    if instances is not None:
        if instances < 1:
            raise HrnetTritonError(f"--instances must be at least 1, got {instances}")
        b = replace(b, instances=instances)
    cfg = pb.ModelConfig(name=variant.name, max_batch_size=b.max_batch_size)
    if target is Target.GPU:
        cfg.platform = "tensorrt_plan"
        if cc_model_filenames:
            for cc, filename in sorted(cc_model_filenames.items()):
                cfg.cc_model_filenames[cc] = filename
            cfg.default_model_filename = cc_model_filenames[max(cc_model_filenames)]
        else:
            cfg.default_model_filename = PLAN_FILE
    elif target is Target.ONNX:
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = ONNX_FILE
    else:
        cfg.backend = "python"

    cfg.input.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=[CHANNELS, CROP_SIZE, CROP_SIZE])
    cfg.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[NUM_CLASSES], label_filename=LABELS_FILE)

    db = cfg.dynamic_batching
    db.preferred_batch_size.extend(b.preferred_batch_sizes)
    db.max_queue_delay_microseconds = b.max_queue_delay_us
    policy = db.default_queue_policy
    policy.timeout_action = pb.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = b.queue_timeout_us
    policy.allow_timeout_override = True
    policy.max_queue_size = b.max_queue_size

    kind = instance_kind or ("gpu" if target is Target.GPU else "cpu")
    cfg.instance_group.add(count=b.instances, kind=pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU)
    cfg.version_policy.latest.num_versions = 1

    if b.cuda_graph_batch_sizes:
        cuda = cfg.optimization.cuda
        cuda.graphs = True
        for size in b.cuda_graph_batch_sizes:
            cuda.graph_spec.add(batch_size=size)

    for size in sorted({1, b.max_batch_size}):
        warm = cfg.model_warmup.add(name=f"random_batch_{size}", batch_size=size)
        warm.inputs[INPUT_NAME].data_type = pb.TYPE_FP32
        warm.inputs[INPUT_NAME].dims.extend([CHANNELS, CROP_SIZE, CROP_SIZE])
        warm.inputs[INPUT_NAME].random_data = True

    params = {"variant": variant.name, **preprocess.to_parameters()}
    if threads is not None and threads < 1:
        raise HrnetTritonError(f"--threads must be at least 1, got {threads}")
    if target is Target.CPU:
        params["onnx_intra_op_threads"] = str(threads or 1)
    elif target is Target.ONNX and threads is not None:
        # Triton's onnxruntime backend reads this; without it ONNX Runtime starts a thread per
        # core of the machine, which in a container is the node's cores, not the pod's CPU limit.
        params["intra_op_thread_count"] = str(threads)
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def config_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse ``config.pbtxt`` text with Triton's protobuf definitions."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


def preprocess_from_config(cfg) -> PreprocessConfig:
    """Read the preprocessing contract back from a config's ``parameters``."""
    return PreprocessConfig.from_parameters({k: v.string_value for k, v in cfg.parameters.items()})


def write_model(
    variant: Variant,
    target: Target,
    out: Path,
    *,
    onnx: Path | None = None,
    plans_dir: Path | None = None,
    threads: int | None = None,
    instance_kind: str | None = None,
    max_batch: int | None = None,
    max_queue_size: int | None = None,
    instances: int | None = None,
) -> Path:
    """Write one model directory (config, labels, and its version directory) under ``out``.

    ``max_batch`` overrides the target's default; for plans it may not exceed their profile.
    """
    from .engine import collect_plans, installed_plan_name

    model_dir = out / variant.name
    model_dir.mkdir(parents=True, exist_ok=True)
    plans = collect_plans(plans_dir, variant) if (target is Target.GPU and plans_dir is not None) else {}
    if plans:
        profile_max = min(m.profile.max for _, m in plans.values())
        if max_batch is not None and max_batch > profile_max:
            raise HrnetTritonError(
                f"--max-batch {max_batch} is above the optimisation profile of the {variant.name} plans (max "
                f"{profile_max}); Triton would send batches the plans cannot run. Use --max-batch <= {profile_max}, "
                "or rebuild the plans with `hrnet-triton engine --max-batch N`"
            )
        max_batch = max_batch or profile_max
    cc_files = {cc: installed_plan_name(cc) for cc in plans}
    cfg = model_config(
        variant, target, threads=threads, instance_kind=instance_kind, max_batch_size=max_batch,
        cc_model_filenames=cc_files or None, max_queue_size=max_queue_size,
        instances=instances,
    )  # fmt: skip
    atomic.write_text(model_dir / "config.pbtxt", config_text(cfg))
    labels = imagenet_labels()
    atomic.write_text(model_dir / LABELS_FILE, "".join(f"{labels[i]}\n" for i in range(len(labels))))

    version = model_dir / VERSION
    for cc, (plan, _) in plans.items():
        with atomic.atomic_path(version / cc_files[cc], ".plan") as tmp:
            shutil.copyfile(plan, tmp)
    if target is Target.GPU and plans_dir is not None and not plans:
        raise HrnetTritonError(f"{plans_dir}: no plans for {variant.name}; build them with `hrnet-triton engine`")
    if target is Target.CPU:
        source = resources.files("hrnet_build").joinpath("triton_python_model.py").read_text("utf-8")
        atomic.write_text(version / PYTHON_MODEL_FILE, source)
    if target is not Target.GPU and onnx is not None:
        if not onnx.is_file():
            raise HrnetTritonError(f"{onnx}: no such ONNX model; create it with `hrnet-triton export {variant.name}`")
        with atomic.atomic_path(version / ONNX_FILE, ".onnx") as tmp:
            shutil.copyfile(onnx, tmp)
    return model_dir


def write_repository(
    target: Target,
    variants: Sequence[Variant],
    out: str | os.PathLike[str],
    *,
    onnx_dir: Path | None = None,
    plans_dir: Path | None = None,
    threads: int | None = None,
    instance_kind: str | None = None,
    max_batch: int | None = None,
    max_queue_size: int | None = None,
    instances: int | None = None,
) -> list[Path]:
    """Write a repository for ``variants``; ONNX models are taken from ``onnx_dir/<name>.onnx``,
    plans (gpu target) from ``plans_dir`` (any ``*.plan`` with its ``*.plan.json`` manifest)."""
    out = Path(out)
    written = []
    for v in variants:
        onnx = onnx_dir / f"{v.name}.onnx" if onnx_dir is not None else None
        written.append(write_model(v, target, out, onnx=onnx, plans_dir=plans_dir, threads=threads, instance_kind=instance_kind, max_batch=max_batch,
                                   max_queue_size=max_queue_size, instances=instances))
        log.info("wrote %s (%s target)", written[-1], target.value)
    return written
