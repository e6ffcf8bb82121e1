"""Repository stage: write a Triton model repository, one model per seed variant.

Each model directory holds its ``config.pbtxt`` (from :mod:`hrnet_build.config`), its labels and
its version directory with the model itself. Three targets share tensor names, dims, labels and
the preprocessing contract; they differ in how the model runs:

- ``gpu``: TensorRT plans (``platform: "tensorrt_plan"``, ``KIND_GPU``), CUDA graphs for the
  common batch sizes; ``max_batch_size`` is the plans' optimisation-profile maximum.
- ``onnx``: Triton's ``onnxruntime`` backend on the exported ONNX model (CPU by default;
  set ``--instance-kind gpu`` for a GPU in the NGC container).
- ``cpu``: the embedded default. Triton's ``python`` backend running ONNX Runtime
  (``hrnet_build/triton_python_model.py``), for the ``tritonserver`` binary in the
  ``nvidia-pytriton`` wheel, which has no onnxruntime backend.

For the gpu target the plans come from the engine stage's directory, read through their
manifests (``X.plan.json``): only plans of the pinned TensorRT version and the chosen precision
are installed, one per compute capability.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from hrnet_core import atomic, release
from hrnet_core.errors import EngineError, HrnetTritonError
from hrnet_core.labels import imagenet_labels
from hrnet_core.manifest import PlanManifest, manifest_path
from hrnet_core.variants import Variant

from .config import (
    LABELS_FILE,
    ONNX_FILE,
    InstanceKind,
    RepositoryOptions,
    Target,
    config_text,
    model_config,
    options_from_config,
    parse_config,
)

__all__ = [
    "InstanceKind",
    "RepositoryOptions",
    "Target",
    "collect_plans",
    "config_text",
    "model_config",
    "options_from_config",
    "parse_config",
    "write_model",
    "write_repository",
]

log = logging.getLogger(__name__)

VERSION = "1"
PYTHON_MODEL_FILE = "model.py"
BUILD_SCRIPT = "build/build_plans.sh"


# -- plans built by the engine stage --------------------------------------------------------------


def installed_plan_name(cc: str) -> str:
    """``7.5`` -> ``model_cc75.plan``: one file per architecture in a model's version directory."""
    return f"model_cc{cc.replace('.', '')}.plan"


def check_plan_manifest(m: PlanManifest, pinned: str = release.TENSORRT_PYTHON_VERSION) -> None:
    """Refuse a plan built with another TensorRT version than the pinned release's.

    Manifests record ``tensorrt.__version__`` (major.minor.patch, "10.5.0"), so they are compared
    with the pin in that same form, :data:`hrnet_core.release.TENSORRT_PYTHON_VERSION`.
    """
    if m.tensorrt_version != pinned:
        raise EngineError(
            f"{m.plan_file} was built with TensorRT {m.tensorrt_version}, but the pinned Triton release "
            f"{release.NGC_RELEASE} runs TensorRT {pinned} ({release.TENSORRT_VERSION}). Triton would refuse it "
            'with "engine plan file is not '
            f'compatible" (plans are tied to the exact TensorRT version). Rebuild it with `bash {BUILD_SCRIPT}`, '
            f"which uses {release.TENSORRT_IMAGE}."
        )


def collect_plans(plans_dir: Path, variant: Variant, precision: str = "fp16") -> dict[str, tuple[Path, PlanManifest]]:
    """The checked ``precision`` plans for ``variant`` in ``plans_dir``, keyed by compute capability.

    Plans of another precision are ignored: after a change of precision the old plans stay on the
    volume beside the new ones, and must not be mistaken for a second plan of the same GPU.
    """
    found: dict[str, tuple[Path, PlanManifest]] = {}
    for manifest_file in sorted(plans_dir.glob("*.plan.json")):
        m = PlanManifest.read(manifest_file)
        if m.variant != variant.name or m.precision != precision:
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
    precision: str = "fp16",
) -> Path:
    """Write one model directory (config, labels, and its version directory) under ``out``.

    For the gpu target, ``max_batch_size`` may not exceed the plans' optimisation profile: with
    ``fit_to_plans`` (when the user did not choose a max batch) it is lowered to the profile's.
    """
    options = options or RepositoryOptions.for_target(target)
    plans = collect_plans(plans_dir, variant, precision) if (target is Target.GPU and plans_dir is not None) else {}
    if target is Target.GPU and plans_dir is not None and not plans:
        raise HrnetTritonError(
            f"{plans_dir}: no {precision} plans for {variant.name}; build them with `hrnet-triton engine`, "
            "or name the plans' precision with --precision"
        )
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
    precision: str = "fp16",
) -> list[Path]:
    """Write a repository for ``variants``; ONNX models are taken from ``onnx_dir/<name>.onnx``,
    plans (gpu target) from ``plans_dir`` (any ``*.plan`` with its ``*.plan.json`` manifest)."""
    written = []
    for v in variants:
        onnx = onnx_dir / f"{v.name}.onnx" if onnx_dir is not None else None
        model = write_model(
            v, Target(target), Path(out), options, onnx=onnx, plans_dir=plans_dir, fit_to_plans=fit_to_plans,
            precision=precision,
        )  # fmt: skip
        written.append(model)
        log.info("wrote %s (%s target)", written[-1], Target(target).value)
    return written
