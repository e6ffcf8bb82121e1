"""Engine stage: exported ONNX -> TensorRT plan, checked against ONNX Runtime before it is installed.

``build_plan`` parses the ONNX model with TensorRT's ONNX parser and builds a serialized engine
with one optimisation profile on the batch dimension (:class:`Profile`), FP16 if asked, a
workspace limit and a persistent timing cache. The plan is then run (through Polygraphy's
``TrtRunner``, which manages the CUDA buffers) on the sample photographs and compared with
ONNX Runtime (:data:`PARITY`); only a plan that passes is written, atomically, with a JSON
manifest beside it.

A plan only loads in the TensorRT version that built it, on the GPU architecture it was built
for. The manifest records both; :func:`check_plan_manifest` refuses a plan from another
TensorRT version than the pinned release's (:mod:`hrnet_core.release`) before Triton fails
with "engine plan file is not compatible".

Without the ``tensorrt`` module or a GPU, :func:`require_tensorrt` stops with the one command
that builds the plans inside the pinned TensorRT container: ``build/build_plans.sh``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrnet_core import atomic, release
from hrnet_core.contract import INPUT_NAME, OUTPUT_NAME
from hrnet_core.errors import EngineError, ManifestError
from hrnet_core.manifest import PlanManifest, Profile, manifest_path
from hrnet_core.parity import ParityLimits, ParityReport, compare
from hrnet_core.preprocess import preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_core.variants import Variant

from .download import sha256_file

log = logging.getLogger(__name__)

WORKSPACE_MIB = 2048
BUILD_SCRIPT = "build/build_plans.sh"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"


PARITY = {
    # FP16 rounds activations to 11 significant bits: classes whose probabilities are within
    # ~1e-3 may swap, so only top-1 and 4 of the top 5 are required.
    Precision.FP16: ParityLimits(max_abs_dprob=1e-2, top1_identical=True, min_top5_overlap=4),
    # FP32 plans differ from ONNX Runtime only by kernel choice and accumulation order
    # (build_plan turns TF32 off for FP32, which TensorRT would otherwise use on Ampere+).
    Precision.FP32: ParityLimits(max_abs_dprob=1e-4, top1_identical=True, min_top5_overlap=5),
}


@dataclass(frozen=True)
class EngineResult:
    """What :func:`engine` did: the plan's manifest, and whether it was built or found current."""

    manifest: PlanManifest
    built: bool
    reason: str  # why it was built ("not built yet", "built for precision fp32, now fp16", ...) or kept


def stale_reason(
    plan: Path,
    onnx_path: Path,
    precision: Precision,
    profile: Profile,
    *,
    tensorrt_version: str,
    compute_capability: str,
) -> str | None:
    """Why the plan at ``plan`` must be (re)built, or None if it is current.

    Current means: the plan and its manifest exist, and the manifest says it was built from
    this very ONNX file (sha256) for this GPU architecture, TensorRT version, precision and
    batch profile. This is what makes ``engine --skip-if-current`` (and so the engine-builder
    Job) idempotent.
    """
    if not plan.is_file() or not manifest_path(plan).is_file():
        return "not built yet"
    try:
        m = PlanManifest.read(plan)
    except ManifestError as err:
        return str(err)
    wanted = {
        "TensorRT version": (m.tensorrt_version, tensorrt_version),
        "compute capability": (m.compute_capability, compute_capability),
        "precision": (m.precision, precision.value),
        "batch profile": ((m.profile.min, m.profile.opt, m.profile.max), (profile.min, profile.opt, profile.max)),
    }
    for what, (built, now) in wanted.items():
        if built != now:
            return f"built for {what} {built}, now {now}"
    if m.onnx_sha256 != sha256_file(onnx_path):
        return f"built from another {onnx_path.name} (sha256 differs)"
    return None


def check_onnx_dynamic_batch(onnx_path: Path) -> str:
    """The ONNX input must have a dynamic first dimension for a batch profile to exist; return its name."""
    import onnx

    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: no such ONNX model; create it with `hrnet-triton export`")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise EngineError(f"{onnx_path}: expected one input named {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    dim0 = inputs[0].type.tensor_type.shape.dim[0]
    if dim0.HasField("dim_value") and dim0.dim_value > 0:
        raise EngineError(
            f"{onnx_path}: the batch dimension is fixed at {dim0.dim_value}; a TensorRT batch profile needs a dynamic "
            "one. Export it again with `hrnet-triton export` (its models have a dynamic batch)"
        )
    return dim0.dim_param or "?"


def require_tensorrt():
    """Import tensorrt and check for a GPU, or stop with how to build the plans elsewhere."""
    how = (
        f"Build the plans on a GPU host inside the pinned TensorRT container ({release.TENSORRT_IMAGE}, "
        f"TensorRT {release.TENSORRT_VERSION}): `bash {BUILD_SCRIPT} artifacts` (see docs/repository.md)."
    )
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"the tensorrt Python module is not installed here. {how}") from None
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise EngineError(f"no NVIDIA driver (libcuda.so.1) on this machine: TensorRT needs a GPU. {how}") from None
    return trt


def build_plan(
    onnx_path: Path, precision: Precision, profile: Profile, *, timing_cache: Path, workspace_mib: int = WORKSPACE_MIB
) -> bytes:
    """Build a serialized TensorRT engine for ``onnx_path`` (needs TensorRT and a GPU)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision is Precision.FP16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; the FP16 plan may be slower than FP32")
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = profile.shapes()
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt_profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine for {onnx_path} (see the TensorRT log above)")
    atomic.write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()).tobytes())
    return bytes(plan)


class TensorRTRunner:
    """A serialized plan run by TensorRT through Polygraphy, which manages the CUDA buffers."""

    def __init__(self, plan: bytes, precision: Precision):
        self.plan = plan
        self.name = f"TensorRT {precision.value}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        with TrtRunner(EngineFromBytes(self.plan)) as runner:
            return runner.infer({INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[OUTPUT_NAME]


def plan_parity(
    reference: np.ndarray, candidate: np.ndarray, names: Sequence[str], precision: Precision
) -> ParityReport:
    """A plan's probabilities against ONNX Runtime's; raise ParityError outside :data:`PARITY`."""
    return compare(
        reference,
        candidate,
        PARITY[precision],
        images=names,
        reference_name=OnnxRuntimeRunner.name,
        candidate_name=f"TensorRT {precision.value}",
    ).require(f"the {precision.value} plan")


def engine(
    variant: Variant,
    onnx_path: Path,
    out: Path,
    *,
    precision: Precision = Precision.FP16,
    max_batch: int = 32,
    timing_cache: Path | None = None,
    images: Sequence[Path] | None = None,
    skip_if_current: bool = False,
) -> EngineResult:
    """Build, check and install the plan for ``variant``.

    With ``skip_if_current``, a plan at ``out`` built from the same ONNX file for this GPU, TensorRT
    version, precision and profile is kept as it is (:func:`stale_reason`).
    """
    check_onnx_dynamic_batch(onnx_path)
    profile = Profile.for_max(max_batch)
    trt = require_tensorrt()
    name, cc = gpu_device()
    reason = stale_reason(out, onnx_path, precision, profile, tensorrt_version=trt.__version__, compute_capability=cc)
    if skip_if_current and reason is None:
        return EngineResult(
            PlanManifest.read(out), built=False, reason="current: same ONNX, GPU, TensorRT, precision, profile"
        )
    photos = [Path(p) for p in (images or sample_images())][: profile.max]
    batch = preprocess_files(photos)
    plan = build_plan(onnx_path, precision, profile, timing_cache=timing_cache or out.parent / "timing.cache")
    report = plan_parity(
        OnnxRuntimeRunner(onnx_path).run(batch),
        TensorRTRunner(plan, precision).run(batch),
        [p.name for p in photos],
        precision,
    )
    manifest = PlanManifest(
        variant=variant.name,
        plan_file=out.name,
        precision=precision.value,
        profile=profile,
        tensorrt_version=trt.__version__,
        gpu_name=name,
        compute_capability=cc,
        onnx_sha256=sha256_file(onnx_path),
        parity=report,
    )
    atomic.write_bytes(out, plan)
    manifest.write(out)
    log.info("%s: %s plan for %s (cc %s) written to %s", variant.name, precision.value, name, cc, out)
    return EngineResult(manifest, built=True, reason=reason or "rebuilt on request")


def gpu_device() -> tuple[str, str]:
    """Device 0's name and compute capability ("7.5"), from the CUDA driver API."""
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuInit(0)
    dev = ctypes.c_int()
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    buf = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(buf, 256, dev)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    return buf.value.decode(), f"{major.value}.{minor.value}"
