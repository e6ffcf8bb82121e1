"""Export stage: PaddleClas weights -> Paddle inference model -> ONNX, checked before it is installed.

``export_onnx`` builds (or takes) a Paddle inference model with a dynamic batch dimension and
a softmax output, converts it with paddle2onnx at opset 17, gives its tensors the project's
stable names (:mod:`hrnet_triton.contract`), and then gates it:

- ``onnx.checker`` with ``full_check=True`` (strict shape inference);
- parity on real photographs: Paddle Inference on the Paddle model against ONNX Runtime on the
  ONNX model, max |Δprob| <= ``PARITY_MAX_ABS`` and the same top-5 classes in the same order;
- the outputs are probabilities (each row sums to 1), and for offline weights they are not
  saturated (calibration worked).

Only a model that passes is written (atomically, with a JSON manifest beside it, and with the
Paddle inference model if asked for).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import hrnet_triton
from hrnet_triton import atomic
from hrnet_triton.contract import CHANNELS, CROP_SIZE, INPUT_NAME, NUM_CLASSES, ONNX_OPSET, OUTPUT_NAME
from hrnet_triton.errors import ExportError, ParityError
from hrnet_triton.variants import Variant

from . import weights as wts
from .download import sha256_file

log = logging.getLogger(__name__)

PARITY_MAX_ABS = 1e-5
TOP_K = 5
PROB_SUM_TOL = 1e-4
SATURATED = 0.999  # a top-1 probability above this on a photograph means the softmax is one-hot
BATCH_DIM = "batch"

STEPS = ("weights", "paddle inference model", "paddle2onnx", "onnx checker", "parity gate", "write")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple[int, ...]  # -1 for the dynamic batch dimension


@dataclass(frozen=True)
class ParityReport:
    images: tuple[str, ...]
    max_abs_diff: float
    top5_identical: bool
    top1_agree: int
    max_top1_prob: float
    min_top1_prob: float
    max_abs_tolerance: float = PARITY_MAX_ABS


@dataclass(frozen=True)
class ExportManifest:
    """What was exported, from what, with which tools, and how it checked out."""

    variant: str
    onnx_file: str
    onnx_sha256: str
    onnx_bytes: int
    opset: int
    input: TensorSpec
    output: TensorSpec
    weights: dict
    versions: dict
    parity: ParityReport
    export_seconds: float
    peak_rss_mib: float
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return asdict(self)


def manifest_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.manifest.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name.removesuffix(".onnx") + ".manifest.json")


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
    from hrnet_client.preprocess import preprocess_files
    from hrnet_client.samples import sample_images

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
                "but its labels are MEANINGLESS. Use --weights auto or a PaddleClas weights file for real predictions. ***",
                variant.name,
            )

        step("paddle inference model")
        if resolved.kind is wts.WeightsKind.INFERENCE_MODEL:
            assert resolved.path is not None
            model = wts.find_inference_model(resolved.path)
            weights_sha = resolved.sha256
        else:
            model, weights_sha = _save_inference_model(variant, resolved, Path(work) / "paddle")

        step("paddle2onnx")
        onnx_model = _standardise(_paddle2onnx(model, Path(work) / "raw.onnx"), variant, resolved)
        in_spec, out_spec = _io_specs(onnx_model)

        step("onnx checker")
        import onnx

        try:
            onnx.checker.check_model(onnx_model, full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"{variant.name}: the ONNX model fails onnx.checker: {err}") from err
        candidate = Path(work) / "model.onnx"
        onnx.save(onnx_model, candidate)

        step("parity gate")
        expected = paddle_predict(model, batch)
        actual = onnxruntime_predict(candidate, batch)
        report = parity(expected, actual, [p.name for p in images], offline=not resolved.labels_meaningful)

        step("write")
        manifest = ExportManifest(
            variant=variant.name,
            onnx_file=out.name,
            onnx_sha256=sha256_file(candidate),
            onnx_bytes=candidate.stat().st_size,
            opset=ONNX_OPSET,
            input=in_spec,
            output=out_spec,
            weights={
                "kind": resolved.kind.value,
                "source": resolved.source,
                "sha256": weights_sha,
                "labels_meaningful": resolved.labels_meaningful,
            },
            versions=tool_versions(),
            parity=report,
            export_seconds=round(time.perf_counter() - start, 1),
            peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        )
        if paddle_model_dir is not None:
            _copy_inference_model(model, Path(paddle_model_dir))
        with atomic.atomic_path(out, ".onnx") as tmp:
            shutil.move(candidate, tmp)  # the work dir may be on another filesystem
        atomic.write_json(manifest_path(out), manifest.to_dict())
    log.info(
        "%s -> %s (%.1f MB); parity max |Δprob| %.2e, top-5 identical on %d photographs",
        variant.name, out, manifest.onnx_bytes / 1e6, report.max_abs_diff, len(images),
    )  # fmt: skip
    return manifest


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
            str(model.graph), str(model.params), str(dest), opset_version=ONNX_OPSET,
            auto_upgrade_opset=False, enable_onnx_checker=True,
        )  # fmt: skip
    except Exception as err:
        raise ExportError(
            f"paddle2onnx failed on {model.graph}: {err}. This project pins paddlepaddle 3.2.2 with "
            "paddle2onnx 2.1.0 (paddlepaddle 3.3.x fails on HRNet); check `pip show paddlepaddle paddle2onnx`"
        ) from err
    if not dest.is_file():
        raise ExportError(f"paddle2onnx wrote no model for {model.graph}")
    return onnx.load(str(dest))


def _rename(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.name == old:
            vi.name = new


def _standardise(model, variant: Variant, resolved: wts.Weights):
    """Give the single input and output their stable names and a named dynamic batch dimension."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"{variant.name}: expected one image input and one output, found inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}"
        )
    taken = {n for node in graph.node for n in [*node.input, *node.output]} | initializers
    for tensor, name in ((inputs[0], INPUT_NAME), (graph.output[0], OUTPUT_NAME)):
        if tensor.name != name:
            if name in taken:
                raise ExportError(f"{variant.name}: cannot rename {tensor.name!r} to {name!r}: the name is in use")
            _rename(graph, tensor.name, name)
        dim0 = tensor.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_value") and dim0.dim_value > 0:
            raise ExportError(
                f"{variant.name}: {name} has a fixed batch size of {dim0.dim_value}; the inference model "
                "must be exported with a dynamic batch dimension (InputSpec shape [None, 3, 224, 224])"
            )
        dim0.dim_param = BATCH_DIM
    meta = {
        "variant": variant.name,
        "producer": f"hrnet-triton {hrnet_triton.__version__}",
        "weights": resolved.kind.value,
        "labels_meaningful": "true" if resolved.labels_meaningful else "false",
    }
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


def _io_specs(model) -> tuple[TensorSpec, TensorSpec]:
    import onnx

    def spec(vi) -> TensorSpec:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(vi.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    in_spec = spec(next(i for i in graph.input if i.name not in initializers))
    out_spec = spec(graph.output[0])
    want_in = TensorSpec(INPUT_NAME, "float32", (-1, CHANNELS, CROP_SIZE, CROP_SIZE))
    want_out = TensorSpec(OUTPUT_NAME, "float32", (-1, NUM_CLASSES))
    if (in_spec, out_spec) != (want_in, want_out):
        raise ExportError(f"the ONNX model's tensors are {in_spec} -> {out_spec}; expected {want_in} -> {want_out}")
    return in_spec, out_spec


def paddle_predict(model: wts.InferenceModel, batch: np.ndarray, *, onednn: bool = False) -> np.ndarray:
    """Run a Paddle inference model on the CPU with Paddle Inference.

    The parity gate uses Paddle's reference CPU kernels (``onednn=False``). PaddleClas's deploy
    config turns oneDNN on; neither is consistently closer to a float64 run of the network, and
    both agree with ONNX Runtime within 4.5e-6 on offline weights (docs/export.md, "The float32
    noise floor under the gate").
    """
    from paddle import inference

    config = inference.Config(str(model.graph), str(model.params))
    config.disable_gpu()
    config.disable_glog_info()
    config.switch_ir_optim(True)
    if onednn:
        config.enable_mkldnn()
    else:
        config.disable_mkldnn()
    config.set_cpu_math_library_num_threads(os.cpu_count() or 1)
    predictor = inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(batch.shape))
    handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def onnxruntime_predict(onnx_path: str | os.PathLike[str], batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch.astype(np.float32)})[0]


def parity(expected: np.ndarray, actual: np.ndarray, names: Sequence[str], *, offline: bool) -> ParityReport:
    """Compare reference and converted probabilities; raise ParityError if the gate fails."""
    if expected.shape != actual.shape or expected.shape != (len(names), NUM_CLASSES):
        raise ParityError(f"output shapes differ: reference {expected.shape}, ONNX {actual.shape}")
    sums = actual.sum(axis=1)
    if np.abs(sums - 1).max() > PROB_SUM_TOL:
        raise ParityError(
            f"the model's outputs are not probabilities (row sums {sums.min():.4f}..{sums.max():.4f}): "
            "the inference model must end in softmax, as PaddleClas's exported models do"
        )
    from hrnet_client.classify import top_k

    diff = float(np.abs(expected - actual).max())
    same_top5 = [bool(np.array_equal(a, b)) for a, b in zip(top_k(expected, TOP_K), top_k(actual, TOP_K))]
    top1 = actual.max(axis=1)
    report = ParityReport(
        images=tuple(names),
        max_abs_diff=diff,
        top5_identical=all(same_top5),
        top1_agree=int((top_k(expected, 1) == top_k(actual, 1)).sum()),
        max_top1_prob=float(top1.max()),
        min_top1_prob=float(top1.min()),
    )
    if diff > PARITY_MAX_ABS or not report.top5_identical:
        bad = [n for n, ok in zip(names, same_top5) if not ok]
        raise ParityError(
            f"parity gate failed: max |Δprob| {diff:.2e} (limit {PARITY_MAX_ABS:.0e}); top-5 differs on {bad or 'none'}. "
            "The ONNX model was not written"
        )
    if offline and report.max_top1_prob > SATURATED:
        raise ParityError(
            f"offline weights are saturated (a top-1 probability of {report.max_top1_prob:.6f}): "
            "BatchNorm calibration did not take effect, so parity would prove nothing"
        )
    return report


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"hrnet-triton": hrnet_triton.__version__, "python": sys.version.split()[0]}
    for dist in ("paddlepaddle", "paddle2onnx", "onnx", "onnxruntime", "numpy", "opencv-python-headless"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
