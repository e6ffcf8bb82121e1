"""The uint8 entry point: the float model behind first nodes that normalise the 8-bit crop.

Built from the session's HRNet_W18_C export (offline weights) with real ONNX Runtime runs; the
TensorRT side is tested up to the build itself (kind detection, NHWC profile shapes, names),
which needs a GPU (docs/export.md, "The uint8 models").
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from hrnet_build import engine, export, onnx_graph
from hrnet_build.engine import Device, Precision
from hrnet_core.contract import DEFAULT_PREPROCESS, PreprocessConfig
from hrnet_core.errors import EngineError, ExportError, HrnetTritonError, ParityError
from hrnet_core.labels import top_k
from hrnet_core.manifest import ExportManifest, PlanManifest, Profile, manifest_path
from hrnet_core.preprocess import load_crop, load_tensor, normalize_chw
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images

T4 = Device("Tesla T4", "7.5")


@pytest.fixture(scope="module")
def u8(w18_offline, tmp_path_factory):
    """HRNet_W18_C_uint8.onnx built by uint8_model from the session's float export, and its manifest."""
    out = tmp_path_factory.mktemp("u8") / "HRNet_W18_C_uint8.onnx"
    return out, export.uint8_model(w18_offline.onnx, out)


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, np.ndarray]:
    """The sample photographs as the float model's tensors and as the uint8 model's crops."""
    images = sample_images()
    return np.stack([load_tensor(p) for p in images]), np.stack([load_crop(p) for p in images])


def _normalisation_model(cfg: PreprocessConfig = DEFAULT_PREPROCESS):
    """The first nodes alone, as a model whose output is the tensor they hand the network."""
    from onnx import TensorProto, helper

    nodes, consts = onnx_graph.normalisation_nodes(cfg)
    graph = helper.make_graph(
        nodes,
        "normalise",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", 224, 224, 3])],
        [helper.make_tensor_value_info(onnx_graph.NORMALISED, TensorProto.FLOAT, ["batch", 3, 224, 224])],
        consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_uint8_model_passes_the_gate_when_built_from_the_float_export(u8, w18_offline, photos):
    path, manifest = u8
    assert manifest.parity.passed and manifest.parity.limits == export.GATE
    assert manifest.parity.top5_identical and manifest.parity.max_abs_dprob <= export.GATE.max_abs_dprob
    tensors, crops = photos
    expected = OnnxRuntimeRunner(w18_offline.onnx).run(tensors)
    actual = OnnxRuntimeRunner(path).run(crops)
    assert np.abs(actual - expected).max() <= export.GATE.max_abs_dprob
    assert np.array_equal(top_k(actual, 5), top_k(expected, 5))


def test_uint8_model_takes_uint8_nhwc_and_starts_with_the_normalisation_when_written(u8):
    path, _ = u8
    model = onnx.load(str(path))
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, inp.type.tensor_type.elem_type, dims) == ("x", onnx.TensorProto.UINT8, ["batch", 224, 224, 3])
    assert out.name == "probabilities"
    assert [n.op_type for n in model.graph.node[:5]] == ["Cast", "Mul", "Sub", "Div", "Transpose"]
    assert list(model.graph.node[4].attribute[0].ints) == [0, 3, 1, 2]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["input_kind"] == "uint8" and meta["variant"] == "HRNet_W18_C" and meta["labels_meaningful"] == "false"
    onnx.checker.check_model(model, full_check=True)


def test_normalisation_nodes_equal_normalize_chw_bit_for_bit_when_run_by_onnx_runtime(photos):
    import onnxruntime as ort

    session = ort.InferenceSession(_normalisation_model().SerializeToString(), providers=["CPUExecutionProvider"])
    tensors, crops = photos
    assert np.array_equal(session.run(None, {"x": crops})[0], tensors)
    every_value = (np.arange(224 * 224 * 3) % 256).astype(np.uint8).reshape(1, 224, 224, 3)  # 0..255 per channel
    assert np.array_equal(session.run(None, {"x": every_value})[0][0], normalize_chw(every_value[0]))


@pytest.mark.parametrize(
    "wrong", [PreprocessConfig(mean=(0.5, 0.5, 0.5)), PreprocessConfig(channel_order="BGR")], ids=["mean", "bgr"]
)
def test_uint8_model_fails_the_gate_and_writes_nothing_when_built_with_a_wrong_contract(w18_offline, tmp_path, wrong):
    out = tmp_path / "wrong_uint8.onnx"
    with pytest.raises(ParityError, match="wrong_uint8.onnx was not written"):
        export.uint8_model(w18_offline.onnx, out, cfg=wrong)
    assert list(tmp_path.iterdir()) == []


def test_uint8_model_is_refused_when_its_source_is_already_a_uint8_model(u8, tmp_path):
    path, _ = u8
    with pytest.raises(ExportError, match="uint8"):
        export.uint8_model(path, tmp_path / "twice.onnx")
    assert list(tmp_path.iterdir()) == []


def test_uint8_model_leaves_nothing_when_its_write_is_interrupted(w18_offline, tmp_path, monkeypatch):
    def interrupted_move(src, dst):
        with open(src, "rb") as fh, open(dst, "wb") as part:
            part.write(fh.read(1 << 20))  # a first megabyte, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(export.shutil, "move", interrupted_move)
    with pytest.raises(KeyboardInterrupt):
        export.uint8_model(w18_offline.onnx, tmp_path / "HRNet_W18_C_uint8.onnx")
    assert list(tmp_path.iterdir()) == []


def test_uint8_manifest_reads_back_with_its_kind_and_an_old_manifest_reads_as_tensor(u8, w18_offline, tmp_path):
    path, manifest = u8
    back = ExportManifest.read(path)
    assert back == manifest and back.input_kind == "uint8"
    assert (back.input.dtype, back.input.dims) == ("uint8", (-1, 224, 224, 3))
    assert ExportManifest.read(w18_offline.onnx).input_kind == "tensor"
    old = json.loads(manifest_path(w18_offline.onnx).read_text())
    old.pop("input_kind", None)  # written before the uint8 models existed
    (tmp_path / "old.onnx.json").write_text(json.dumps(old))
    assert ExportManifest.read(tmp_path / "old.onnx").input_kind == "tensor"


def test_onnx_runtime_runner_refuses_float_tensors_when_the_model_takes_uint8(u8, photos):
    path, _ = u8
    with pytest.raises(HrnetTritonError, match="takes uint8 crops"):
        OnnxRuntimeRunner(path).run(photos[0])


def test_engine_reads_the_input_kind_and_dims_when_given_either_model(u8, w18_offline):
    path, _ = u8
    assert engine.onnx_input(path) == engine.OnnxInput("uint8", (224, 224, 3), "batch")
    assert engine.onnx_input(w18_offline.onnx) == engine.OnnxInput("tensor", (3, 224, 224), "batch")


def test_engine_refuses_an_input_that_is_neither_kind(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["probabilities"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["batch", 224, 224, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 224, 224, 3])],
    )
    path = tmp_path / "int32.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(EngineError, match=r"int32 \[224, 224, 3\] after the batch"):
        engine.onnx_input(path)


def test_profile_shapes_are_nhwc_when_the_model_takes_uint8():
    shapes = Profile.for_max(32).shapes(engine.OnnxInput("uint8", (224, 224, 3), "batch").dims)
    assert shapes == {"min": (1, 224, 224, 3), "opt": (16, 224, 224, 3), "max": (32, 224, 224, 3)}
    assert Profile.for_max(32).shapes()["max"] == (32, 3, 224, 224)  # the tensor models', as before
    with pytest.raises(EngineError, match="fixed dimensions"):
        Profile.for_max(8).shapes((0, 224, 3))


def test_plan_path_names_the_uint8_plan_after_the_served_model(tmp_path):
    assert engine.plan_path(tmp_path, "HRNet_W18_C", T4, Precision.FP16, "uint8").name == (
        "HRNet_W18_C_uint8.sm75.fp16.plan"
    )
    assert engine.plan_path(tmp_path, "HRNet_W18_C", T4, Precision.FP16).name == "HRNet_W18_C.sm75.fp16.plan"


def test_plan_parity_batch_is_the_uint8_crops_when_the_model_takes_uint8(photos):
    images = sample_images()[:2]
    crops = engine.parity_batch(images, "uint8")
    assert crops.dtype == np.uint8 and np.array_equal(crops, photos[1][:2])
    assert np.array_equal(engine.parity_batch(images, "tensor"), photos[0][:2])


def test_plan_manifest_records_the_input_kind_and_an_old_one_reads_as_tensor(u8, tmp_path):
    _, exported = u8
    plan = tmp_path / "HRNet_W18_C_uint8.sm75.fp16.plan"
    m = PlanManifest(
        variant="HRNet_W18_C", plan_file=plan.name, precision="fp16", profile=Profile.for_max(8),
        tensorrt_version="10.5.0", gpu_name=T4.name, compute_capability=T4.cc, onnx_sha256=exported.onnx_sha256,
        parity=exported.parity, input_kind="uint8",
    )  # fmt: skip
    m.write(plan)
    assert PlanManifest.read(plan) == m
    old = json.loads(manifest_path(plan).read_text())
    del old["input_kind"]
    manifest_path(plan).write_text(json.dumps(old))
    assert PlanManifest.read(plan).input_kind == "tensor"
