"""Engine stage: exported ONNX -> TensorRT plan, checked against ONNX Runtime before it is installed.

``build_plan`` parses the ONNX model with TensorRT's ONNX parser and builds a serialized engine
with one optimisation profile on the batch dimension (:class:`Profile`), FP16 if asked, a
workspace limit and a persistent timing cache. The plan is then run (through Polygraphy's
``TrtRunner``, which manages the CUDA buffers) on the sample photographs and compared with
ONNX Runtime (:data:`PARITY`); only a plan that passes is written, atomically, with a JSON
manifest beside it.

A plan only loads in the TensorRT version that built it, on the GPU architecture it was built
for. The manifest records both; :func:`check_plan_manifest` refuses a plan from another
TensorRT version than the pinned release's (:mod:`hrnet_triton.release`) before Triton fails
with "engine plan file is not compatible".

Without the ``tensorrt`` module or a GPU, :func:`require_tensorrt` stops with the one command
that builds the plans inside the pinned TensorRT container: ``build/build_plans.sh``.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hrnet_triton import atomic, release
from hrnet_triton.contract import CHANNELS, CROP_SIZE, INPUT_NAME, OUTPUT_NAME
from hrnet_triton.errors import HrnetTritonError
from hrnet_triton.variants import Variant

log = logging.getLogger(__name__)

MAX_SUPPORTED_BATCH = 256
WORKSPACE_MIB = 2048
BUILD_SCRIPT = "build/build_plans.sh"


class EngineError(HrnetTritonError):
    """A plan cannot be built, fails its check, or does not fit this release."""


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"


@dataclass(frozen=True)
class ParityLimits:
    """What a plan must reproduce of ONNX Runtime's output on the photographs."""

    top1_identical: bool
    min_top5_overlap: int  # of 5, on every image
    max_abs_dprob: float


PARITY = {
    # FP16 rounds activations to 11 significant bits: classes whose probabilities are within
    # ~1e-3 may swap, so only top-1 and 4 of the top 5 are required (the gate).
    Precision.FP16: ParityLimits(top1_identical=True, min_top5_overlap=4, max_abs_dprob=1e-2),
    # FP32 plans differ from ONNX Runtime only by kernel choice and accumulation order
    # (build_plan turns TF32 off for FP32, which TensorRT would otherwise use on Ampere+).
    Precision.FP32: ParityLimits(top1_identical=True, min_top5_overlap=5, max_abs_dprob=1e-4),
}


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile over the batch dimension: min <= opt <= max.

    ``opt`` is the batch size TensorRT tunes kernels for. Under Triton's dynamic batcher the
    batches that run most under load are the preferred sizes, so ``opt`` is the middle of
    them (see :meth:`for_max`); min is 1 so that a lone request never waits for company.
    """

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise EngineError(f"profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        if self.max > MAX_SUPPORTED_BATCH:
            raise EngineError(f"--max-batch {self.max} is above the supported {MAX_SUPPORTED_BATCH}")

    @classmethod
    def for_max(cls, max_batch: int) -> Profile:
        """min 1, opt = the largest power of two <= max/2 (at least 1), max as given."""
        if max_batch < 1:
            raise EngineError(f"--max-batch must be at least 1, got {max_batch}")
        opt = 1
        while opt * 2 <= max_batch // 2:
            opt *= 2
        return cls(1, max(1, min(opt, max_batch)), max_batch)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: (getattr(self, k), CHANNELS, CROP_SIZE, CROP_SIZE) for k in ("min", "opt", "max")}

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max


@dataclass(frozen=True)
class PlanManifest:
    variant: str
    plan_file: str
    precision: str
    profile: Profile
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", as Triton's cc_model_filenames keys it
    onnx_sha256: str
    parity: dict
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PlanManifest:
        return cls(**{**d, "profile": Profile(**d["profile"])})

    @classmethod
    def read(cls, path: Path) -> PlanManifest:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise EngineError(f"{path}: not a readable plan manifest ({err}); rebuild the plan with `hrnet-triton engine`") from err


def plan_manifest_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def check_plan_manifest(m: PlanManifest, pinned: str = release.TENSORRT_VERSION) -> None:
    """Refuse a plan built with another TensorRT version than the pinned release's."""
    if m.tensorrt_version != pinned:
        raise EngineError(
            f"{m.plan_file} was built with TensorRT {m.tensorrt_version}, but the pinned Triton release "
            f"{release.NGC_RELEASE} runs TensorRT {pinned}. Triton would refuse it with \"engine plan file is not "
            f"compatible\" (plans are tied to the exact TensorRT version). Rebuild it with `bash {BUILD_SCRIPT}`, which "
            f"uses {release.TENSORRT_IMAGE}."
        )


def stale_reason(
    plan: Path, onnx_path: Path, precision: Precision, profile: Profile, *, tensorrt_version: str, compute_capability: str
) -> str | None:
    """Why the plan at ``plan`` must be (re)built, or None if it is current.

    Current means: the plan and its manifest exist, and the manifest says it was built from
    this very ONNX file (sha256) for this GPU architecture, TensorRT version, precision and
    batch profile. This is what makes ``engine --skip-if-current`` (and so the engine-builder
    Job) idempotent.
    """
    from hrnet_build.download import sha256_file

    manifest_file = plan_manifest_path(plan)
    if not plan.is_file() or not manifest_file.is_file():
        return "not built yet"
    try:
        m = PlanManifest.read(manifest_file)
    except EngineError as err:
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


def check_onnx_dynamic_batch(onnx_path: Path) -> None:
    """The ONNX input must have a dynamic first dimension for a batch profile to exist."""
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


def build_plan(onnx_path: Path, precision: Precision, profile: Profile, *, timing_cache: Path, workspace_mib: int = WORKSPACE_MIB) -> bytes:
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


def run_plan(plan: bytes, batch: np.ndarray) -> np.ndarray:
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(plan)) as runner:
        return runner.infer({INPUT_NAME: batch})[OUTPUT_NAME]


def plan_parity(expected: np.ndarray, actual: np.ndarray, names: Sequence[str], precision: Precision) -> dict:
    """Compare a plan's probabilities with ONNX Runtime's; raise EngineError if outside :data:`PARITY`."""
    from hrnet_client.classify import top_k

    limits = PARITY[precision]
    if expected.shape != actual.shape:
        raise EngineError(f"plan output shape {actual.shape} differs from ONNX Runtime's {expected.shape}")
    e5, a5 = top_k(expected, 5), top_k(actual, 5)
    overlap = [len(set(x) & set(y)) for x, y in zip(e5, a5)]
    top1 = [bool(x[0] == y[0]) for x, y in zip(e5, a5)]
    diff = float(np.abs(expected - actual).max())
    report = {
        "images": list(names),
        "max_abs_dprob": diff,
        "top1_identical": all(top1),
        "min_top5_overlap": min(overlap),
        "limits": asdict(limits),
    }
    bad = [n for n, t, o in zip(names, top1, overlap) if (limits.top1_identical and not t) or o < limits.min_top5_overlap]
    if bad or diff > limits.max_abs_dprob:
        raise EngineError(
            f"{precision.value} plan fails its check against ONNX Runtime: max |Δprob| {diff:.2e} "
            f"(limit {limits.max_abs_dprob:.0e}), top-1/top-5 mismatch on {bad or 'none'}. The plan was not written"
        )
    return report


def engine(
    variant: Variant,
    onnx_path: Path,
    out: Path,
    *,
    precision: Precision = Precision.FP16,
    max_batch: int = 32,
    timing_cache: Path | None = None,
    images: Sequence[Path] | None = None,
) -> PlanManifest:
    """Build, check and install the plan for ``variant``; return its manifest."""
    from hrnet_build.download import sha256_file
    from hrnet_build.export import onnxruntime_predict
    from hrnet_client.preprocess import preprocess_files
    from hrnet_client.samples import sample_images

    check_onnx_dynamic_batch(onnx_path)
    profile = Profile.for_max(max_batch)
    trt = require_tensorrt()
    timing_cache = timing_cache or out.parent / "timing.cache"
    photos = [Path(p) for p in (images or sample_images())]
    batch = preprocess_files(photos)
    if len(batch) > profile.max:
        batch = batch[: profile.max]
        photos = photos[: profile.max]

    plan = build_plan(onnx_path, precision, profile, timing_cache=timing_cache)
    report = plan_parity(onnxruntime_predict(onnx_path, batch), run_plan(plan, batch), [p.name for p in photos], precision)

    import ctypes

    name, cc = _gpu_name_and_cc(ctypes)
    manifest = PlanManifest(
        variant=variant.name, plan_file=out.name, precision=precision.value, profile=profile,
        tensorrt_version=trt.__version__, gpu_name=name, compute_capability=cc,
        onnx_sha256=sha256_file(onnx_path), parity=report,
    )  # fmt: skip
    atomic.write_bytes(out, plan)
    atomic.write_json(plan_manifest_path(out), manifest.to_dict())
    log.info("%s: %s plan for %s (cc %s) written to %s", variant.name, precision.value, name, cc, out)
    return manifest


def _gpu_name_and_cc(ctypes) -> tuple[str, str]:
    """Device 0's name and compute capability, from the CUDA driver API."""
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


def installed_plan_name(cc: str) -> str:
    """``7.5`` -> ``model_cc75.plan``: one file per architecture in a model's version directory."""
    return f"model_cc{cc.replace('.', '')}.plan"


def collect_plans(plans_dir: Path, variant: Variant) -> dict[str, tuple[Path, PlanManifest]]:
    """The checked plans for ``variant`` in ``plans_dir``, keyed by compute capability."""
    found: dict[str, tuple[Path, PlanManifest]] = {}
    for manifest_file in sorted(plans_dir.glob("*.plan.json")):
        m = PlanManifest.read(manifest_file)
        if m.variant != variant.name:
            continue
        check_plan_manifest(m)
        plan = manifest_file.with_name(manifest_file.name.removesuffix(".json"))
        if not plan.is_file():
            raise EngineError(f"{manifest_file} describes {plan.name}, which is missing")
        if m.compute_capability in found:
            raise EngineError(f"two plans for {variant.name} on compute capability {m.compute_capability}: "
                              f"{found[m.compute_capability][0].name} and {plan.name}")  # fmt: skip
        found[m.compute_capability] = (plan, m)
    return found
