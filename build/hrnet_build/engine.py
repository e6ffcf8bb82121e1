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
from hrnet_core.contract import INPUT_NAME, OUTPUT_NAME, model_name
from hrnet_core.errors import EngineError, ManifestError
from hrnet_core.manifest import PlanManifest, Profile, manifest_path
from hrnet_core.parity import ParityLimits, ParityReport, compare, parity_batch
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_core.variants import Variant

from . import onnx_graph
from .download import sha256_file

log = logging.getLogger(__name__)

# The builder's workspace limit caps the tactic scratch each execution context holds on the GPU.
# At 256 MiB all ten models, two instances each at max batch 32, fit a 16 GB T4 or V100 with 10%
# headroom (docs/gpu-memory.md); at 2 GiB they would not. A tactic that needs more is skipped.
WORKSPACE_MIB = 256
MIN_COMPUTE_CAPABILITY = (7, 0)  # TensorRT 10 supports SM 7.0 (Volta) and newer
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

    path: Path
    manifest: PlanManifest
    built: bool
    reason: str  # why it was built ("not built yet", "built for precision fp32, now fp16", ...) or kept


def stale_reason(
    plan: Path, onnx_path: Path, precision: Precision, profile: Profile, *, tensorrt_version: str, device: Device
) -> str | None:
    """Why the plan at ``plan`` must be (re)built, or None if it is current.

    Current means: the plan and its manifest exist, and the manifest says it was built from this
    very ONNX file (sha256) on this GPU model (name and compute capability), with this TensorRT
    version (as ``tensorrt.__version__`` reports it), precision and batch profile. This is what
    makes ``engine --skip-if-current`` (and so the engine-builder Job) idempotent. The GPU name
    counts, not only the compute capability: a plan is tuned for the device that built it.
    """
    if not plan.is_file() or not manifest_path(plan).is_file():
        return "not built yet"
    try:
        m = PlanManifest.read(plan)
    except ManifestError as err:
        return str(err)
    wanted = {
        "TensorRT version": (m.tensorrt_version, tensorrt_version),
        "GPU": (m.gpu_name, device.name),
        "compute capability": (m.compute_capability, device.cc),
        "precision": (m.precision, precision.value),
        "batch profile": ((m.profile.min, m.profile.opt, m.profile.max), (profile.min, profile.opt, profile.max)),
    }
    for what, (built, now) in wanted.items():
        if built != now:
            return f"built for {what} {built}, now {now}"
    if m.onnx_sha256 != sha256_file(onnx_path):
        return f"built from another {onnx_path.name} (sha256 differs)"
    return None


@dataclass(frozen=True)
class OnnxInput:
    """An ONNX model's input as the engine reads it: its kind (from its dtype: float32 is "tensor",
    uint8 is "uint8"), its dimensions after the batch (NCHW or NHWC), and the batch's name."""

    kind: str
    dims: tuple[int, ...]
    batch: str


def check_onnx_dynamic_batch(onnx_path: Path) -> str:
    """The ONNX input must have a dynamic first dimension for a batch profile to exist; return its name."""
    return onnx_input(onnx_path).batch


def onnx_input(onnx_path: Path) -> OnnxInput:
    """Read and check the ONNX model's input: one input ``x``, a dynamic batch, and the float32 NCHW
    or UINT8 NHWC shape of a tensor or uint8 model (:mod:`hrnet_build.onnx_graph`)."""
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
    t = inputs[0].type.tensor_type
    dims = tuple(d.dim_value for d in t.shape.dim[1:])
    kind = {onnx.TensorProto.FLOAT: "tensor", onnx.TensorProto.UINT8: "uint8"}.get(t.elem_type)
    wanted = {"tensor": onnx_graph.TENSOR_INPUT, "uint8": onnx_graph.UINT8_INPUT}.get(kind or "")
    if wanted is None or dims != wanted.dims[1:]:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "undefined"
        raise EngineError(
            f"{onnx_path}: input {INPUT_NAME!r} is {dtype} {list(dims)} after the batch; the engine builds "
            f"float32 {list(onnx_graph.TENSOR_INPUT.dims[1:])} (tensor) or uint8 "
            f"{list(onnx_graph.UINT8_INPUT.dims[1:])} (uint8) models, as `hrnet-triton export` writes them"
        )
    return OnnxInput(kind, dims, dim0.dim_param or "?")


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
        config.set_flag(trt.BuilderFlag.FP16)  # every GPU TensorRT 10 supports (SM 7.0+) has fast FP16
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = profile.shapes(onnx_input(onnx_path).dims)  # NCHW, or NHWC for a uint8 model
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt_profile)
    use_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine for {onnx_path} (see the TensorRT log above)")
    save_timing_cache(config, timing_cache)
    return bytes(plan)


def use_timing_cache(config, path: Path) -> bool:
    """Give the builder the timing cache at ``path``; a cache TensorRT refuses (another version or
    device, or damaged) is replaced by a new, empty one. Returns whether the saved cache was used."""
    data = path.read_bytes() if path.is_file() else b""
    if data:
        if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
            return True
        log.warning("TensorRT refused the timing cache %s (another TensorRT version or GPU?); starting a new one", path)
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise EngineError("TensorRT refused even an empty timing cache; build without one by deleting --timing-cache")
    return False


def save_timing_cache(config, path: Path) -> None:
    """Write the builder's timing cache to ``path`` (atomically); a missing cache is logged, not fatal:
    the plan is already built and must not be lost to it."""
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("TensorRT returned no timing cache after the build; %s was not updated", path)
        return
    atomic.write_bytes(path, memoryview(cache.serialize()).tobytes())


def timing_cache_path(plans_dir: Path, tensorrt_version: str, device: Device) -> Path:
    """One timing cache per TensorRT version and GPU model: TensorRT refuses caches from other
    versions, and timings from one GPU (a T4) mislead the tactic choice on another of the same
    compute capability (an RTX 2080)."""
    return plans_dir / f"timing.trt{tensorrt_version}.{device.slug}.cache"


def plan_path(plans_dir: Path, variant: str, device: Device, precision: Precision, input_kind: str = "tensor") -> Path:
    """``plans/HRNet_W18_C.sm75.fp16.plan`` (``HRNet_W18_C_uint8.sm75.fp16.plan`` for the uint8
    model): the names `repo` and the engine-builder Job expect."""
    return plans_dir / f"{model_name(variant, input_kind)}.sm{device.cc.replace('.', '')}.{precision.value}.plan"


class TensorRTRunner:
    """A serialized plan run by TensorRT through Polygraphy, which manages the CUDA buffers."""

    def __init__(self, plan: bytes, precision: Precision, input_kind: str = "tensor"):
        self.plan = plan
        self.name = f"TensorRT {precision.value}"
        self.dtype = np.uint8 if input_kind == "uint8" else np.float32  # the uint8 plan takes the crops

    def run(self, batch: np.ndarray) -> np.ndarray:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        with TrtRunner(EngineFromBytes(self.plan)) as runner:
            return runner.infer({INPUT_NAME: np.ascontiguousarray(batch, dtype=self.dtype)})[OUTPUT_NAME]


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
    out: Path | None = None,
    *,
    plans_dir: Path | None = None,
    precision: Precision = Precision.FP16,
    max_batch: int = 32,
    timing_cache: Path | None = None,
    images: Sequence[Path] | None = None,
    skip_if_current: bool = False,
) -> EngineResult:
    """Build, check and install the plan for ``variant`` at ``out``, or in ``plans_dir`` under the
    name :func:`plan_path` gives it for this GPU (with the timing cache :func:`timing_cache_path`).

    With ``skip_if_current``, a plan built from the same ONNX file for this GPU, TensorRT version,
    precision and profile is kept as it is (:func:`stale_reason`).
    """
    if (out is None) == (plans_dir is None):
        raise EngineError("give the plan's path (--out) or the directory of plans (--plans-dir), not both")
    source = onnx_input(onnx_path)
    profile = Profile.for_max(max_batch)
    trt = require_tensorrt()
    device = gpu_device()
    if plans_dir is not None:
        out = plan_path(plans_dir, variant.name, device, precision, source.kind)
        timing_cache = timing_cache or timing_cache_path(plans_dir, trt.__version__, device)
    assert out is not None
    reason = stale_reason(out, onnx_path, precision, profile, tensorrt_version=trt.__version__, device=device)
    if skip_if_current and reason is None:
        current = "current (same ONNX, GPU, TensorRT, precision, profile)"
        return EngineResult(out, PlanManifest.read(out), built=False, reason=current)
    photos = [Path(p) for p in (images or sample_images())][: profile.max]
    batch = parity_batch(photos, source.kind)
    timing_cache = timing_cache or timing_cache_path(out.parent, trt.__version__, device)
    plan = build_plan(onnx_path, precision, profile, timing_cache=timing_cache)
    names = [p.name for p in photos]
    report = plan_parity(
        OnnxRuntimeRunner(onnx_path).run(batch),
        TensorRTRunner(plan, precision, source.kind).run(batch),
        names,
        precision,
    )
    manifest = PlanManifest(
        variant=variant.name, plan_file=out.name, precision=precision.value, profile=profile,
        tensorrt_version=trt.__version__, gpu_name=device.name, compute_capability=device.cc,
        onnx_sha256=sha256_file(onnx_path), parity=report, input_kind=source.kind,
    )  # fmt: skip
    atomic.write_bytes(out, plan)
    manifest.write(out)
    log.info("%s: %s plan for %s (cc %s) written to %s", variant.name, precision.value, device.name, device.cc, out)
    return EngineResult(out, manifest, built=True, reason=reason or "rebuilt on request")


@dataclass(frozen=True)
class Device:
    """A CUDA device as TensorRT sees it: its name and compute capability ("7.5")."""

    name: str
    cc: str

    @property
    def slug(self) -> str:
        """The name as a file-name part: "Tesla T4" -> "tesla-t4"."""
        return "-".join("".join(c if c.isalnum() else " " for c in self.name.lower()).split()) or "gpu"


_CU_COMPUTE_CAPABILITY_MAJOR, _CU_COMPUTE_CAPABILITY_MINOR = 75, 76


def gpu_device(index: int = 0) -> Device:
    """The name and compute capability of CUDA device ``index``, from the CUDA driver API.

    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set first (unless already set) so that device 0 is the one
    nvidia-smi lists first, and every driver call is checked.
    """
    import ctypes
    import os

    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise EngineError(f"no NVIDIA driver (libcuda.so.1) on this machine ({err}): TensorRT needs a GPU") from None

    def check(what: str, code: int) -> None:
        if code != 0:
            name = ctypes.c_char_p()
            lib.cuGetErrorName(code, ctypes.byref(name))
            raise EngineError(
                f"the CUDA driver failed {what}: error {code} ({(name.value or b'?').decode()}); "
                "check nvidia-smi, CUDA_VISIBLE_DEVICES and that the container has the GPU (--gpus all)"
            )

    check("to initialise (cuInit)", lib.cuInit(0))
    dev = ctypes.c_int()
    check(f"to open device {index} (cuDeviceGet)", lib.cuDeviceGet(ctypes.byref(dev), index))
    buf = ctypes.create_string_buffer(256)
    check("to read the device name", lib.cuDeviceGetName(buf, 256, dev))
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(
        "to read the compute capability",
        lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_COMPUTE_CAPABILITY_MAJOR, dev),
    )
    check(
        "to read the compute capability",
        lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_COMPUTE_CAPABILITY_MINOR, dev),
    )
    return require_supported(Device(buf.value.decode(), f"{major.value}.{minor.value}"))


def require_supported(device: Device) -> Device:
    """Refuse a GPU older than TensorRT 10 supports (compute capability 7.0, Volta)."""
    if tuple(int(x) for x in device.cc.split(".")) < MIN_COMPUTE_CAPABILITY:
        low = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        raise EngineError(
            f"{device.name} has compute capability {device.cc}; TensorRT {release.TENSORRT_VERSION} builds plans for "
            f"{low} and newer (Volta, Turing, Ampere, Ada, Hopper). Serve this GPU with the onnx target instead"
        )
    return device
