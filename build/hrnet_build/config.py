"""Triton model configs: :class:`RepositoryOptions` -> ``ModelConfig`` -> ``config.pbtxt``, and back.

Configs are built as ``ModelConfig`` messages of Triton's own protobuf definitions
(``tritonclient.grpc.model_config_pb2``) and written in its text format, so whatever this
module writes is a config Triton can parse. :func:`model_config` generates one from a
:class:`RepositoryOptions` (a frozen value, validated once and passed whole);
:func:`options_from_config` reads the options back, so the generator and the parser are checked
against each other. Each target's defaults are ``RepositoryOptions.for_target``, explained in
docs/repository.md.

Each variant is served three ways (docs/inputs.md): :func:`model_config` writes the ``tensor``
and ``uint8`` models, :func:`ensemble_config` the ``image`` ensemble, and
:func:`preprocess_config` the one ``hrnet_preprocess`` model the ensembles share
(``RepositoryOptions.for_preprocess`` holds its defaults).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from hrnet_core.contract import (
    CHANNELS,
    CROP_SIZE,
    DEFAULT_PREPROCESS,
    IMAGE_INPUT_NAME,
    INPUT_KIND_PARAMETER,
    INPUT_NAME,
    MAX_PIXELS,
    NUM_CLASSES,
    OUTPUT_NAME,
    PREPROCESS_MODEL,
    PreprocessConfig,
    model_name,
    triton_parameters,
)
from hrnet_core.errors import HrnetTritonError
from hrnet_core.runtime import CPU_RUNTIMES, ONNXRUNTIME, OPENVINO, require_cpu_precision
from hrnet_core.variants import Variant

LABELS_FILE = "labels.txt"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
# The kinds a runtime serves (the third, "image", is an ensemble of hrnet_preprocess and "tensor").
RUNTIME_KINDS = ("tensor", "uint8")
# hrnet_preprocess's parameters beside the preprocessing contract.
MAX_PIXELS_PARAMETER = "max_pixels"
DECODE_THREADS_PARAMETER = "decode_threads"
# The cpu and onnx targets' runtime (openvino or onnxruntime) and its precision (fp32 or bf16),
# written into every runtime model's parameters; the cpu target's python model reads them.
RUNTIME_PARAMETER = "runtime"
PRECISION_PARAMETER = "precision"


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
    runtime: str | None = None  # cpu and onnx targets: openvino or onnxruntime (gpu: None, TensorRT)
    precision: str = "fp32"  # the CPU runtime's precision: fp32, or bf16 with openvino (gpu: the plans')

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
        if self.runtime is not None:
            require_cpu_precision(self.runtime, self.precision)
            if self.runtime == OPENVINO and self.instance_kind is InstanceKind.GPU:
                raise HrnetTritonError("the openvino runtime serves CPU instances; use --runtime onnxruntime on a GPU")

    @classmethod
    def for_target(cls, target: Target) -> RepositoryOptions:
        """The target's defaults (docs/repository.md gives the measurements behind them)."""
        return _DEFAULTS[Target(target)]

    @classmethod
    def for_preprocess(cls, target: Target) -> RepositoryOptions:
        """``hrnet_preprocess``'s defaults on ``target`` (``threads``: images decoded at once per batch)."""
        return _PREPROCESS_DEFAULTS[Target(target)]

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
        runtime: str | None = None,
        precision: str | None = None,
    ) -> RepositoryOptions:
        """These options with the given fields changed (None keeps a field); validated again."""
        out = self if max_batch is None else self.with_max_batch(max_batch)
        changes = {"instances": instances, "max_queue_size": max_queue_size, "threads": threads}
        changes.update(instance_kind=instance_kind, runtime=runtime, precision=precision)
        if instance_kind == "gpu" and runtime is None and out.runtime is not None:
            changes["runtime"] = ONNXRUNTIME  # OpenVINO serves CPU instances only
        return dataclasses.replace(out, **{k: v for k, v in changes.items() if v is not None})


_DEFAULTS: dict[Target, RepositoryOptions] = {
    # T4/V100: batch 8 costs 1.4-5.5x batch 1 for 8x the images, and a 1 ms window is small
    # against 6-40 ms of compute (seed table; docs/repository.md). Two instances overlap
    # copies with compute.
    Target.GPU: RepositoryOptions(
        32, (8, 16, 32), 1000, 256, 2_000_000, 2, InstanceKind.GPU, cuda_graph_batch_sizes=(1, 8, 16, 32)
    ),
    # Triton's openvino backend in the NGC image (docs/cpu-speed.md); a CPU gains little from
    # big batches, and 8 keeps latency bounded.
    Target.ONNX: RepositoryOptions(16, (4, 8), 2000, 64, 5_000_000, 1, InstanceKind.CPU, runtime=OPENVINO),
    # The embedded default on a 2-core machine: OpenVINO FP32, two instances of one thread
    # each, which beat one instance of two threads at every point measured but one (a tie), FP32 and BF16
    # (docs/cpu-speed.md), and no preferred sizes or delay: an instance takes whatever is waiting
    # when it frees up, instead of merging two concurrent requests onto one instance while the
    # other idles (measured in docs/repository.md).
    Target.CPU: RepositoryOptions(8, (), 0, 32, 5_000_000, 2, InstanceKind.CPU, threads=1, runtime=OPENVINO),
}

# hrnet_preprocess, on the CPU whatever the target. Its max_batch_size is raised by the
# repository writer to the largest of the models it feeds. Decoding and resizing a photograph
# takes milliseconds against the classifier's tens to hundreds (docs/inputs.md), so on the cpu
# target one instance of one thread keeps up and leaves both cores to ONNX Runtime. The gpu and
# onnx pods have 4 cores: two instances, each decoding a batch's images on two threads (not
# measured on a GPU: none was available).
_PREPROCESS_DEFAULTS: dict[Target, RepositoryOptions] = {
    Target.GPU: RepositoryOptions(32, (), 0, 256, 2_000_000, 2, InstanceKind.CPU, threads=2),
    Target.ONNX: RepositoryOptions(16, (), 0, 64, 5_000_000, 2, InstanceKind.CPU, threads=2),
    Target.CPU: RepositoryOptions(8, (), 0, 32, 5_000_000, 1, InstanceKind.CPU, threads=1),
}


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise HrnetTritonError("writing Triton configs needs tritonclient: pip install 'hrnet-triton[client]'") from err
    return model_config_pb2


# -- generator: options -> ModelConfig ------------------------------------------------------------


def _runtime_input(kind: str) -> tuple[int, list[int], int]:
    """(data type, dims, format) of input ``x`` for a ``tensor`` or ``uint8`` model."""
    pb = _pb()
    if kind == "tensor":
        return pb.TYPE_FP32, [CHANNELS, CROP_SIZE, CROP_SIZE], pb.ModelInput.FORMAT_NCHW
    if kind == "uint8":
        return pb.TYPE_UINT8, [CROP_SIZE, CROP_SIZE, CHANNELS], pb.ModelInput.FORMAT_NHWC
    raise HrnetTritonError(f"a runtime serves input kinds {RUNTIME_KINDS}, not {kind!r}")


def model_config(
    variant: Variant,
    target: Target,
    options: RepositoryOptions | None = None,
    *,
    kind: str = "tensor",
    preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
    cc_model_filenames: dict[str, str] | None = None,
):
    """The ``ModelConfig`` message for ``variant`` on ``target`` (``options``: the target's defaults),
    taking ``kind`` input: ``tensor`` (float32 NCHW) or ``uint8`` (the crop, NHWC).

    For ``gpu``, ``cc_model_filenames`` maps compute capabilities ("7.5") to plan files in the
    version directory.
    """
    pb = _pb()
    o = options or RepositoryOptions.for_target(target)
    data_type, dims, layout = _runtime_input(kind)
    cfg = pb.ModelConfig(name=model_name(variant.name, kind), max_batch_size=o.max_batch_size)
    _set_runtime(cfg, target, o, cc_model_filenames)
    cfg.input.add(name=INPUT_NAME, data_type=data_type, format=layout, dims=dims)
    cfg.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[NUM_CLASSES], label_filename=LABELS_FILE)
    _set_batching(cfg, o)
    group = pb.ModelInstanceGroup.KIND_GPU if o.instance_kind is InstanceKind.GPU else pb.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=o.instances, kind=group)
    cfg.version_policy.latest.num_versions = 1
    if o.cuda_graph_batch_sizes:
        cfg.optimization.cuda.graphs = True
        for size in o.cuda_graph_batch_sizes:
            cfg.optimization.cuda.graph_spec.add(batch_size=size)
    for size in sorted({1, o.max_batch_size}):
        warm = cfg.model_warmup.add(name=f"random_batch_{size}", batch_size=size)
        warm.inputs[INPUT_NAME].data_type = data_type
        warm.inputs[INPUT_NAME].dims.extend(dims)
        # zeros, not random_data: random bytes read as float32 hold NaN and Inf, which the cpu target refuses
        warm.inputs[INPUT_NAME].zero_data = True
    _set_parameters(cfg, variant.name, kind, preprocess, _runtime_parameters(target, o))
    return cfg


def _set_parameters(cfg, variant: str | None, kind: str, preprocess: PreprocessConfig, extra: dict[str, str]) -> None:
    """The contract a client reads from the config: the variant, the input kind, the preprocessing."""
    named = {"variant": variant} if variant else {}
    params = {**named, INPUT_KIND_PARAMETER: kind, **preprocess.to_parameters(), **extra}
    for key, value in params.items():
        cfg.parameters[key].string_value = value


def ensemble_config(variant: Variant, max_batch_size: int, *, preprocess: PreprocessConfig = DEFAULT_PREPROCESS):
    """``<variant>_image``: encoded image bytes -> ``hrnet_preprocess`` -> ``<variant>`` -> probabilities.

    ``max_batch_size`` is the tensor model's. Its output carries the labels, so Triton's
    classification extension answers through the ensemble too.
    """
    pb = _pb()
    cfg = pb.ModelConfig(name=model_name(variant.name, "image"), platform="ensemble", max_batch_size=max_batch_size)
    cfg.input.add(name=IMAGE_INPUT_NAME, data_type=pb.TYPE_STRING, dims=[1])
    cfg.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[NUM_CLASSES], label_filename=LABELS_FILE)
    decode = cfg.ensemble_scheduling.step.add(model_name=PREPROCESS_MODEL, model_version=-1)
    decode.input_map[IMAGE_INPUT_NAME] = IMAGE_INPUT_NAME
    decode.output_map[INPUT_NAME] = INPUT_NAME
    classify = cfg.ensemble_scheduling.step.add(model_name=model_name(variant.name, "tensor"), model_version=-1)
    classify.input_map[INPUT_NAME] = INPUT_NAME
    classify.output_map[OUTPUT_NAME] = OUTPUT_NAME
    _set_parameters(cfg, variant.name, "image", preprocess, {})
    return cfg


def preprocess_config(
    target: Target,
    options: RepositoryOptions | None = None,
    *,
    preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
    max_pixels: int = MAX_PIXELS,
):
    """``hrnet_preprocess``: the python-backend model turning encoded images into the tensor model's
    input, with ``hrnet_core.preprocess`` (build/hrnet_build/triton_preprocess_model.py)."""
    pb = _pb()
    o = options or RepositoryOptions.for_preprocess(target)
    if max_pixels < 1:
        raise HrnetTritonError(f"max_pixels must be at least 1, got {max_pixels}")
    cfg = pb.ModelConfig(name=PREPROCESS_MODEL, backend="python", max_batch_size=o.max_batch_size)
    cfg.input.add(name=IMAGE_INPUT_NAME, data_type=pb.TYPE_STRING, dims=[1])
    cfg.output.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=[CHANNELS, CROP_SIZE, CROP_SIZE])
    _set_batching(cfg, o)
    cfg.instance_group.add(count=o.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    cfg.version_policy.latest.num_versions = 1
    extra = {MAX_PIXELS_PARAMETER: str(max_pixels), DECODE_THREADS_PARAMETER: str(o.threads or 1)}
    _set_parameters(cfg, None, "image", preprocess, extra)
    return cfg


def _set_runtime(cfg, target: Target, o: RepositoryOptions, cc_model_filenames: dict[str, str] | None) -> None:
    if target is Target.GPU:
        cfg.platform = "tensorrt_plan"
        for cc, filename in sorted((cc_model_filenames or {}).items()):
            cfg.cc_model_filenames[cc] = filename
        cfg.default_model_filename = PLAN_FILE
        if cc_model_filenames:
            newest = max(cc_model_filenames, key=lambda cc: tuple(int(x) for x in cc.split(".")))
            cfg.default_model_filename = cc_model_filenames[newest]
    elif target is Target.ONNX:
        cfg.backend = o.runtime or ONNXRUNTIME  # Triton's openvino or onnxruntime backend
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


# The parameter each runtime reads its thread count from: the cpu target's python model
# (build/hrnet_build/triton_python_model.py), Triton's onnxruntime backend, Triton's openvino
# backend. Without it a runtime starts a thread per core of the machine, which in a container is
# the node's cores, not the pod's CPU limit.
CPU_THREADS_PARAMETER = "runtime_threads"
_THREADS_PARAMETER = {
    (Target.CPU, OPENVINO): CPU_THREADS_PARAMETER,
    (Target.CPU, ONNXRUNTIME): CPU_THREADS_PARAMETER,
    (Target.ONNX, ONNXRUNTIME): "intra_op_thread_count",
    (Target.ONNX, OPENVINO): "INFERENCE_NUM_THREADS",
}


def _runtime_parameters(target: Target, o: RepositoryOptions) -> dict[str, str]:
    """The runtime, its precision and threads, as the cpu and onnx targets' parameters."""
    if target is Target.GPU or o.runtime is None:
        return {}
    params = {RUNTIME_PARAMETER: o.runtime, PRECISION_PARAMETER: o.precision}
    if target is Target.ONNX and o.runtime == OPENVINO:
        # The openvino backend's own keys: one stream per instance (Triton's instances are the
        # parallelism), latency-tuned, and BF16 when asked (docs/cpu-speed.md).
        params.update(NUM_STREAMS="1", PERFORMANCE_HINT="LATENCY")
        if o.precision == "bf16":
            params["HINT_BF16"] = "YES"
    if o.threads is not None:
        params[_THREADS_PARAMETER[target, o.runtime]] = str(o.threads)
    return params


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
    return Target.ONNX if cfg.backend in CPU_RUNTIMES else Target.CPU


def options_from_config(cfg) -> RepositoryOptions:
    """The :class:`RepositoryOptions` a ``ModelConfig`` was written from (the inverse of :func:`model_config`
    and :func:`preprocess_config`; an ensemble has none)."""
    pb = _pb()
    if not cfg.instance_group:
        raise HrnetTritonError(f"{cfg.name} has no instances to read options from (an ensemble?)")
    db, group, params, target = cfg.dynamic_batching, cfg.instance_group[0], triton_parameters(cfg), target_of(cfg)
    runtime = None if target is Target.GPU or cfg.name == PREPROCESS_MODEL else params.get(RUNTIME_PARAMETER)
    key = DECODE_THREADS_PARAMETER if cfg.name == PREPROCESS_MODEL else _THREADS_PARAMETER.get((target, runtime), "")
    threads = params.get(key)
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
        runtime=runtime,
        precision=params.get(PRECISION_PARAMETER, "fp32") if runtime else "fp32",
    )
