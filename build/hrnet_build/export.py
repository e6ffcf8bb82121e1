"""Export stage: PaddleClas weights -> Paddle inference model -> ONNX, checked before it is installed.

``export_onnx`` builds (or takes) a Paddle inference model with a dynamic batch dimension and
a softmax output, converts it with paddle2onnx at opset 17, gives its tensors the project's
stable names (:mod:`hrnet_core.contract`), and then gates it:

- ``onnx.checker`` with ``full_check=True`` (strict shape inference);
- parity on real photographs: Paddle Inference on the Paddle model against ONNX Runtime on the
  ONNX model, max |Δprob| <= ``PARITY_MAX_ABS`` and the same top-5 classes in the same order;
- the outputs are probabilities (each row sums to 1), and for offline weights they are not
  saturated (calibration worked).

Only a model that passes is written (atomically, with a JSON manifest beside it, and with the
Paddle inference model if asked for).

Every export then writes the ``uint8`` entry point beside it (:func:`uint8_model`): ``X_uint8.onnx``,
the same network behind first nodes that normalise the 8-bit crop, gated against ``X.onnx`` alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

import hrnet_core
from hrnet_core import atomic
from hrnet_core.contract import CHANNELS, CROP_SIZE, DEFAULT_PREPROCESS, INPUT_NAME, ONNX_OPSET, PreprocessConfig
from hrnet_core.errors import ExportError, ParityError
from hrnet_core.manifest import ExportManifest, TensorSpec
from hrnet_core.parity import ParityLimits, ParityReport, compare
from hrnet_core.preprocess import load_crop, preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_core.variants import Variant

from . import onnx_graph
from . import weights as wts
from .download import sha256_file

log = logging.getLogger(__name__)

# Paddle Inference -> ONNX Runtime: the same float32 network, so only rounding may differ
# (docs/export.md measures the noise floor at 4.5e-6); the top-5 must not even change order.
GATE = ParityLimits(max_abs_dprob=1e-5, top1_identical=True, min_top5_overlap=5, top5_same_order=True)
PROB_SUM_TOL = 1e-4
SATURATED = 0.999  # a top-1 probability above this on a photograph means the softmax is one-hot

STEPS = ("weights", "paddle inference model", "paddle2onnx", "onnx checker", "parity gate", "write", "uint8 model")


@contextlib.contextmanager
def _steps(progress: bool) -> Iterator:
    from tqdm import tqdm

    with tqdm(total=len(STEPS), unit="step", disable=not progress, file=sys.stderr) as bar:
        started: list[str] = []

        def step(name: str) -> None:
            if started:
                bar.update(1)
            started.append(name)
            bar.set_description(name)
            log.debug("export step: %s", name)

        yield step
        bar.update(len(STEPS) - bar.n)


def export_onnx(
    variant: Variant,
    spec: wts.WeightsSpec,
    out: str | os.PathLike[str],
    *,
    parity_images: Sequence[str | os.PathLike[str]] | None = None,
    paddle_model_dir: str | os.PathLike[str] | None = None,
    cache: Path | None = None,
    progress: bool = True,
) -> ExportManifest:
    """Export ``variant`` with the weights ``spec`` names to ``out`` (an ``.onnx`` path)."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"--out {out}: the output file must end in .onnx")
    images = [Path(p) for p in (parity_images or sample_images())]
    batch = preprocess_files(images)  # fail on a bad image before any slow work
    start = time.perf_counter()

    with _steps(progress) as step, tempfile.TemporaryDirectory(prefix="hrnet-export-") as work:
        step("weights")
        resolved = wts.resolve(variant, spec, cache=cache, progress=progress)
        if not resolved.labels_meaningful:
            log.warning(
                "*** %s: OFFLINE WEIGHTS. Seeded and calibrated, not trained: the model runs like the real one, "
                "but its labels are MEANINGLESS. Use --weights auto or a PaddleClas weights file for real "
                "predictions. ***",
                variant.name,
            )
        step("paddle inference model")
        model, weights_sha = _paddle_model(variant, resolved, Path(work) / "paddle")
        step("paddle2onnx")
        onnx_model = _standardise(_paddle2onnx(model, Path(work) / "raw.onnx"), variant, resolved)
        in_spec, out_spec = onnx_graph.io_specs(onnx_model)
        step("onnx checker")
        candidate = _checked_save(onnx_model, variant.name, Path(work) / "model.onnx")
        step("parity gate")
        report = gate(
            PaddleInferenceRunner(model),
            OnnxRuntimeRunner(candidate),
            batch,
            [p.name for p in images],
            offline=not resolved.labels_meaningful,
        )
        step("write")
        weights = {"kind": resolved.kind.value, "source": resolved.source, "sha256": weights_sha}
        weights["labels_meaningful"] = resolved.labels_meaningful
        manifest = _manifest(variant.name, out, candidate, (in_spec, out_spec), weights, report, start)
        if paddle_model_dir is not None:
            _copy_inference_model(model, Path(paddle_model_dir))
        with atomic.atomic_path(out, ".onnx") as tmp:
            shutil.move(candidate, tmp)  # the work dir may be on another filesystem
        manifest.write(out)
        step("uint8 model")
        u8 = uint8_model(out, parity_images=images)
    log.info("%s -> %s (%.1f MB); %s", variant.name, out, manifest.onnx_bytes / 1e6, report.summary())
    log.info("%s uint8 input -> %s; %s", variant.name, onnx_graph.uint8_path(out), u8.parity.summary())
    return manifest


def _manifest(
    variant: str,
    out: Path,
    candidate: Path,
    specs: tuple[TensorSpec, TensorSpec],
    weights: dict,
    report: ParityReport,
    start: float,
    input_kind: str = "tensor",
) -> ExportManifest:
    return ExportManifest(
        variant=variant,
        onnx_file=out.name,
        onnx_sha256=sha256_file(candidate),
        onnx_bytes=candidate.stat().st_size,
        opset=ONNX_OPSET,
        input=specs[0],
        output=specs[1],
        weights=weights,
        versions=tool_versions(),
        parity=report,
        export_seconds=round(time.perf_counter() - start, 1),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        input_kind=input_kind,
    )


def _paddle_model(variant: Variant, resolved: wts.Weights, work: Path) -> tuple[wts.InferenceModel, str]:
    """The Paddle inference model to convert, and the hash of its weights."""
    if resolved.kind is wts.WeightsKind.INFERENCE_MODEL:
        assert resolved.path is not None and resolved.sha256 is not None
        return wts.find_inference_model(resolved.path), resolved.sha256
    return _save_inference_model(variant, resolved, work)


def _checked_save(onnx_model, name: str, dest: Path) -> Path:
    import onnx

    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{name}: the ONNX model fails onnx.checker: {err}") from err
    onnx.save(onnx_model, dest)
    return dest


def _save_inference_model(variant: Variant, resolved: wts.Weights, dest: Path) -> tuple[wts.InferenceModel, str]:
    """Build the network with its weights and save it as a Paddle inference model."""
    import paddle

    from .calibrate import offline_model
    from .network import build

    if resolved.kind is wts.WeightsKind.OFFLINE:
        net = offline_model(variant, with_softmax=True)
    else:
        assert resolved.path is not None
        net = build(variant.width, variant.has_se, with_softmax=True)
        wts.load_pdparams(net, resolved.path)
    net.eval()
    weights_sha = resolved.sha256 or wts.state_dict_sha256(net)
    spec = paddle.static.InputSpec([None, CHANNELS, CROP_SIZE, CROP_SIZE], "float32", INPUT_NAME)
    paddle.jit.save(net, str(dest / "inference"), input_spec=[spec])
    return wts.find_inference_model(dest), weights_sha


def _copy_inference_model(model: wts.InferenceModel, dest: Path) -> None:
    with atomic.atomic_path(dest) as tmp:
        tmp.mkdir()
        for f in (model.graph, model.params):
            shutil.copy2(f, tmp / f.name)
    log.info("Paddle inference model saved in %s", dest)


def _paddle2onnx(model: wts.InferenceModel, dest: Path):
    import onnx

    # paddle2onnx turns on Polygraphy's pip auto-install of missing modules; Polygraphy reads
    # the setting once, on import, so importing it first with the setting off keeps builds
    # from installing packages. Its dependencies are this project's (the `export` extra).
    os.environ["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"
    import paddle2onnx
    import polygraphy.config  # noqa: F401
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.VERBOSE if log.isEnabledFor(logging.DEBUG) else G_LOGGER.ERROR

    try:
        paddle2onnx.export(
            str(model.graph),
            str(model.params),
            str(dest),
            opset_version=ONNX_OPSET,
            auto_upgrade_opset=False,
            enable_onnx_checker=True,
        )
    except Exception as err:
        raise ExportError(
            f"paddle2onnx failed on {model.graph}: {err}. This project pins paddlepaddle 3.2.2 with "
            "paddle2onnx 2.1.0 (paddlepaddle 3.3.x fails on HRNet); check `pip show paddlepaddle paddle2onnx`"
        ) from err
    if not dest.is_file():
        raise ExportError(f"paddle2onnx wrote no model for {model.graph}")
    return onnx.load(str(dest))


def _standardise(model, variant: Variant, resolved: wts.Weights):
    """Stable names, a named dynamic batch dimension, and the metadata (:func:`onnx_graph.standardise`)."""
    meta = {
        "variant": variant.name,
        "producer": f"hrnet-triton {hrnet_core.__version__}",
        "weights": resolved.kind.value,
        "labels_meaningful": "true" if resolved.labels_meaningful else "false",
    }
    return onnx_graph.standardise(model, variant.name, meta)


def uint8_model(
    float_onnx: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    parity_images: Sequence[str | os.PathLike[str]] | None = None,
) -> ExportManifest:
    """The exported float model ``X.onnx`` behind first nodes that take the 8-bit crop, written to
    ``out`` (default ``X_uint8.onnx`` beside it, :func:`onnx_graph.uint8_path`) with its manifest.

    Input ``x`` becomes UINT8 NHWC [batch, 224, 224, 3], channels in ``cfg.channel_order``; Cast,
    Mul, Sub, Div and Transpose compute ``(x * float32(scale) - mean) / std`` in float32 and NCHW,
    PaddleClas's order, so the network gets :func:`~hrnet_core.preprocess.normalize_chw`'s tensor bit
    for bit (:func:`onnx_graph.prepend_normalisation`). Gated like the export (:data:`GATE`): ONNX
    Runtime on the crops (:func:`~hrnet_core.preprocess.load_crop` with ``cfg``) against ONNX Runtime
    on the float model fed the contract's tensors (:data:`~hrnet_core.contract.DEFAULT_PREPROCESS`).
    Only a model that passes is written, atomically; a failing one raises :class:`ParityError`.
    """
    import onnx

    start = time.perf_counter()
    float_onnx = Path(float_onnx)
    out = Path(out) if out is not None else onnx_graph.uint8_path(float_onnx)
    if out.suffix != ".onnx" or out.resolve() == float_onnx.resolve():
        raise ExportError(f"{out}: the uint8 model needs its own path ending in .onnx, not {float_onnx}")
    source = ExportManifest.read(float_onnx)  # the float model's record: variant, weights
    images = [Path(p) for p in (parity_images or sample_images())]
    tensors = preprocess_files(images)  # the float path, as the tensor model is served
    crops = np.stack([load_crop(p, cfg) for p in images])
    model = onnx_graph.prepend_normalisation(onnx.load(str(float_onnx)), cfg)
    specs = onnx_graph.io_specs(model, onnx_graph.UINT8_INPUT)
    with tempfile.TemporaryDirectory(prefix="hrnet-uint8-") as work:
        candidate = _checked_save(model, f"{source.variant} (uint8)", Path(work) / "model.onnx")
        reference, candidate_runner = OnnxRuntimeRunner(float_onnx), OnnxRuntimeRunner(candidate)
        reference.name, candidate_runner.name = "ONNX Runtime, float tensors", "ONNX Runtime, uint8 crops"
        report = gate(
            reference,
            candidate_runner,
            tensors,
            [p.name for p in images],
            offline=not source.weights.get("labels_meaningful", True),
            candidate_batch=crops,
            what=f"the uint8 model {out.name}",
        )
        manifest = _manifest(source.variant, out, candidate, specs, source.weights, report, start, "uint8")
        with atomic.atomic_path(out, ".onnx") as tmp:
            shutil.move(candidate, tmp)
            manifest.write(out)  # before the model is renamed into place: an interrupt leaves neither
    log.info("%s -> %s (uint8 NHWC input); %s", float_onnx.name, out, report.summary())
    return manifest


class PaddleInferenceRunner:
    """A Paddle inference model run on the CPU by Paddle Inference (a :class:`~hrnet_core.runtime.Runner`).

    The parity gate uses Paddle's reference CPU kernels (``onednn=False``). PaddleClas's deploy
    config turns oneDNN on; neither is consistently closer to a float64 run of the network, and
    both agree with ONNX Runtime within 4.5e-6 on offline weights (docs/export.md, "The float32
    noise floor under the gate").
    """

    name = "Paddle Inference"

    def __init__(self, model: wts.InferenceModel, *, onednn: bool = False, threads: int | None = None):
        from paddle import inference

        config = inference.Config(str(model.graph), str(model.params))
        config.disable_gpu()
        config.disable_glog_info()
        config.switch_ir_optim(True)
        if onednn:
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
        config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
        self.predictor = inference.create_predictor(config)

    def run(self, batch: np.ndarray) -> np.ndarray:
        predictor = self.predictor
        handle = predictor.get_input_handle(predictor.get_input_names()[0])
        handle.reshape(list(batch.shape))
        handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        predictor.run()
        return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def gate(
    reference,
    candidate,
    batch: np.ndarray,
    names: Sequence[str],
    *,
    offline: bool,
    candidate_batch: np.ndarray | None = None,
    what: str = "the ONNX model",
) -> ParityReport:
    """The export's gate: ``candidate`` (ONNX Runtime) against ``reference`` (Paddle Inference) on
    the photographs; raise :class:`ParityError` unless it passes :data:`GATE`. ``candidate_batch``
    is the candidate's own input for the same photographs (the uint8 crops), if it is not ``batch``."""
    expected = reference.run(batch)
    actual = candidate.run(batch if candidate_batch is None else candidate_batch)
    sums = actual.sum(axis=1)
    if np.abs(sums - 1).max() > PROB_SUM_TOL:
        raise ParityError(
            f"the model's outputs are not probabilities (row sums {sums.min():.4f}..{sums.max():.4f}): "
            "the inference model must end in softmax, as PaddleClas's exported models do"
        )
    report = compare(
        expected, actual, GATE, images=names, reference_name=reference.name, candidate_name=candidate.name
    ).require(what)
    if offline and report.max_top1_prob > SATURATED:
        raise ParityError(
            f"offline weights are saturated (a top-1 probability of {report.max_top1_prob:.6f}): "
            "BatchNorm calibration did not take effect, so parity would prove nothing"
        )
    return report


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"hrnet-triton": hrnet_core.__version__, "python": sys.version.split()[0]}
    for dist in ("paddlepaddle", "paddle2onnx", "onnx", "onnxruntime", "numpy", "opencv-python-headless"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
