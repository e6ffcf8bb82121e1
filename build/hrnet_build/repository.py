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

Every variant is written three ways (docs/inputs.md): ``<V>`` (float32 tensor), ``<V>_uint8``
(the uint8 crop; written when its model is there: ``<V>_uint8.onnx`` in ``onnx_dir``, or plans
whose manifest says ``input_kind: uint8``; without a model source every config is written, as
the contract) and ``<V>_image`` (an ensemble: encoded bytes -> ``hrnet_preprocess`` -> ``<V>``).
``hrnet_preprocess`` is written once, with ``triton_preprocess_model.py`` as its model.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from hrnet_core import atomic, release
from hrnet_core.contract import INPUT_KINDS, MAX_PIXELS, PREPROCESS_MODEL, model_name
from hrnet_core.errors import EngineError, HrnetTritonError
from hrnet_core.labels import imagenet_labels
from hrnet_core.manifest import PlanManifest, manifest_path
from hrnet_core.runtime import OPENVINO
from hrnet_core.variants import Variant

from . import cpu_gate
from .config import (
    LABELS_FILE,
    ONNX_FILE,
    InstanceKind,
    RepositoryOptions,
    Target,
    config_text,
    ensemble_config,
    model_config,
    options_from_config,
    parse_config,
    preprocess_config,
)

__all__ = [
    "InstanceKind",
    "RepositoryOptions",
    "Target",
    "collect_plans",
    "config_text",
    "ensemble_config",
    "model_config",
    "options_from_config",
    "parse_config",
    "preprocess_config",
    "write_ensemble",
    "write_model",
    "write_preprocess",
    "write_repository",
]

log = logging.getLogger(__name__)

VERSION = "1"
PYTHON_MODEL_FILE = "model.py"
MODEL_SOURCES = {"runtime": "triton_python_model.py", "preprocess": "triton_preprocess_model.py"}
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


def collect_plans(
    plans_dir: Path, variant: Variant, precision: str = "fp16", kind: str = "tensor"
) -> dict[str, tuple[Path, PlanManifest]]:
    """The checked ``precision`` plans for ``variant`` taking ``kind`` input, in ``plans_dir``, keyed by
    compute capability.

    Plans of another precision are ignored: after a change of precision the old plans stay on the
    volume beside the new ones, and must not be mistaken for a second plan of the same GPU. So are
    plans of the other input kind (a manifest without ``input_kind`` is a ``tensor`` plan).
    """
    found: dict[str, tuple[Path, PlanManifest]] = {}
    for manifest_file in sorted(plans_dir.glob("*.plan.json")):
        m = PlanManifest.read(manifest_file)
        if m.variant != variant.name or m.precision != precision or m.input_kind != kind:
            continue
        check_plan_manifest(m)
        plan = manifest_file.with_name(manifest_file.name.removesuffix(".json"))
        if not plan.is_file() or manifest_path(plan) != manifest_file:
            raise EngineError(f"{manifest_file} describes {plan.name}, which is missing")
        if m.compute_capability in found:
            raise EngineError(
                f"two {kind} plans for {variant.name} on compute capability {m.compute_capability}: "
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
    kind: str = "tensor",
    onnx: Path | None = None,
    plans_dir: Path | None = None,
    fit_to_plans: bool = True,
    precision: str = "fp16",
    gate: bool = True,
) -> Path:
    """Write one model directory (config, labels, and its version directory) under ``out``.

    For the gpu target, ``max_batch_size`` may not exceed the plans' optimisation profile: with
    ``fit_to_plans`` (when the user did not choose a max batch) it is lowered to the profile's.
    With the openvino runtime, the model is first gated against ONNX Runtime at the options'
    precision (:mod:`hrnet_build.cpu_gate`); ``gate=False`` skips that and says so in the config.
    """
    return _write_model(variant, target, out, options, kind, onnx, plans_dir, fit_to_plans, precision, gate)[0]


def _write_model(variant, target, out, options, kind, onnx, plans_dir, fit_to_plans, precision, gate=True):
    """:func:`write_model`, also returning the ``ModelConfig`` it wrote."""
    options = options or RepositoryOptions.for_target(target)
    name = model_name(variant.name, kind)
    plans = collect_plans(plans_dir, variant, precision, kind) if (target is Target.GPU and plans_dir) else {}
    if target is Target.GPU and plans_dir is not None and not plans:
        raise HrnetTritonError(
            f"{plans_dir}: no {precision} plans for {name}; build them with `hrnet-triton engine`, "
            "or name the plans' precision with --precision"
        )
    if plans:
        options = _fit_to_plans(options, variant, min(m.profile.max for _, m in plans.values()), fit_to_plans)
    if target is not Target.GPU and onnx is not None and not onnx.is_file():
        raise HrnetTritonError(f"{onnx}: no such ONNX model; create it with `hrnet-triton export {variant.name}`")
    cc_files = {cc: installed_plan_name(cc) for cc in plans}
    cfg = model_config(variant, target, options, kind=kind, cc_model_filenames=cc_files or None)
    if options.runtime == OPENVINO and onnx is not None:
        cfg.parameters[cpu_gate.PARITY_PARAMETER].string_value = _gated(onnx, options, kind, gate)
    model_dir = out / name
    atomic.write_text(model_dir / "config.pbtxt", config_text(cfg))
    _write_labels(model_dir)
    version = model_dir / VERSION
    for cc, (plan, _) in plans.items():
        with atomic.atomic_path(version / cc_files[cc], ".plan") as tmp:
            shutil.copyfile(plan, tmp)
    if target is Target.CPU:
        _write_python_model(version, "runtime")
    if target is not Target.GPU and onnx is not None:
        with atomic.atomic_path(version / ONNX_FILE, ".onnx") as tmp:
            shutil.copyfile(onnx, tmp)
    return model_dir, cfg


def _gated(onnx: Path, options: RepositoryOptions, kind: str, gate: bool) -> str:
    """Gate ``onnx`` under OpenVINO at ``options.precision`` (raising if it fails); the line for the config."""
    if not gate:
        log.warning("%s: OpenVINO %s NOT gated against ONNX Runtime (gate=False)", onnx.name, options.precision)
        return f"not checked: OpenVINO {options.precision} written without its parity gate"
    report = cpu_gate.gate(onnx, options.precision, input_kind=kind, threads=options.threads or 0)
    log.info("%s: %s", onnx.name, report.summary())
    return report.summary()


def _write_labels(model_dir: Path) -> None:
    labels = imagenet_labels()
    atomic.write_text(model_dir / LABELS_FILE, "".join(f"{labels[i]}\n" for i in range(len(labels))))


def _write_python_model(version: Path, which: str) -> None:
    source = resources.files("hrnet_build").joinpath(MODEL_SOURCES[which]).read_text("utf-8")
    atomic.write_text(version / PYTHON_MODEL_FILE, source)


def write_ensemble(variant: Variant, out: Path, max_batch_size: int) -> Path:
    """``<variant>_image``: its config, labels (for the classification extension) and empty version directory."""
    cfg = ensemble_config(variant, max_batch_size)
    model_dir = out / cfg.name
    atomic.write_text(model_dir / "config.pbtxt", config_text(cfg))
    _write_labels(model_dir)
    (model_dir / VERSION).mkdir(exist_ok=True)  # an ensemble has no files, but Triton needs its version
    return model_dir


def write_preprocess(target: Target, out: Path, options: RepositoryOptions, max_pixels: int = MAX_PIXELS) -> Path:
    """``hrnet_preprocess``: its config and ``1/model.py`` (build/hrnet_build/triton_preprocess_model.py)."""
    model_dir = out / PREPROCESS_MODEL
    atomic.write_text(
        model_dir / "config.pbtxt", config_text(preprocess_config(target, options, max_pixels=max_pixels))
    )
    _write_python_model(model_dir / VERSION, "preprocess")
    return model_dir


def _runtime_kinds(variant: Variant, target: Target, onnx_dir: Path | None, plans_dir: Path | None, precision: str):
    """The runtime-served kinds to write: ``tensor`` always; ``uint8`` when its model is there or
    no model source is named (configs only)."""
    if target is Target.GPU:
        uint8 = plans_dir is None or bool(collect_plans(plans_dir, variant, precision, "uint8"))
    else:
        uint8 = onnx_dir is None or (onnx_dir / f"{model_name(variant.name, 'uint8')}.onnx").is_file()
    return ("tensor", "uint8") if uint8 else ("tensor",)


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
    preprocess_options: RepositoryOptions | None = None,
    max_pixels: int = MAX_PIXELS,
    kinds: Sequence[str] = INPUT_KINDS,
    gate: bool = True,
) -> list[Path]:
    """Write a repository for ``variants``, each as ``<V>``, ``<V>_uint8`` and ``<V>_image`` (of these,
    the ``kinds`` asked for), and ``hrnet_preprocess`` for the ensembles. ONNX models are taken from
    ``onnx_dir/<name>.onnx``, plans (gpu target) from ``plans_dir`` (any ``*.plan`` with its
    ``*.plan.json`` manifest). ``preprocess_options`` (default ``RepositoryOptions.for_preprocess``)
    get the largest ``max_batch_size`` of the models it feeds. ``gate``: see :func:`write_model`."""
    target, out, wanted = Target(target), Path(out), set(kinds)
    if not wanted or wanted - set(INPUT_KINDS) or ("image" in wanted and "tensor" not in wanted):
        raise HrnetTritonError(
            f"input kinds {sorted(wanted)}: choose among {', '.join(INPUT_KINDS)}; "
            "image needs tensor, the model its ensemble runs"
        )
    written, largest = [], 1
    for v in variants:
        for kind in (k for k in _runtime_kinds(v, target, onnx_dir, plans_dir, precision) if k in wanted):
            onnx = onnx_dir / f"{model_name(v.name, kind)}.onnx" if onnx_dir is not None else None
            model_dir, cfg = _write_model(v, target, out, options, kind, onnx, plans_dir, fit_to_plans, precision, gate)
            written.append(model_dir)
            if kind == "tensor" and "image" in wanted:
                written.append(write_ensemble(v, out, cfg.max_batch_size))
                largest = max(largest, cfg.max_batch_size)
    if "image" in wanted:
        pre = preprocess_options or RepositoryOptions.for_preprocess(target)
        written.append(write_preprocess(target, out, pre.with_max_batch(largest), max_pixels))
    for model in written:
        log.info("wrote %s (%s target)", model, target.value)
    return written
