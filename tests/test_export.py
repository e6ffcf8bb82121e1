"""The export stage end to end: weights -> Paddle inference model -> ONNX, with its gates."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from hrnet_build import export
from hrnet_build.export import export_onnx
from hrnet_build.weights import WeightsSpec
from hrnet_core import variants
from hrnet_core.contract import INPUT_NAME, OUTPUT_NAME
from hrnet_core.errors import ExportError, ParityError
from hrnet_core.manifest import ExportManifest, manifest_path
from hrnet_core.preprocess import preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_triton.cli import main


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return preprocess_files(sample_images())


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_offline_export_has_dynamic_batch_input_and_probability_output(w18_offline):
    model = onnx.load(str(w18_offline.onnx))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, _dims(inp), inp.type.tensor_type.elem_type) == (
        INPUT_NAME,
        ["batch", 3, 224, 224],
        onnx.TensorProto.FLOAT,
    )
    assert (out.name, _dims(out), out.type.tensor_type.elem_type) == (
        OUTPUT_NAME,
        ["batch", 1000],
        onnx.TensorProto.FLOAT,
    )
    assert model.opset_import[0].version == 17
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["variant"] == "HRNet_W18_C" and meta["labels_meaningful"] == "false"


def test_offline_export_gives_unsaturated_probabilities_on_real_photographs(w18_offline, photos):
    probs = OnnxRuntimeRunner(w18_offline.onnx).run(photos)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    top1 = probs.max(axis=1)
    assert top1.max() < 0.99, "softmax saturated: calibration failed"
    assert top1.min() > 10 / 1000, "softmax near uniform: the parity gate would be weak"
    assert len({int(i) for i in probs.argmax(axis=1)}) >= 3, "photographs should not all get one class"


def test_exported_model_gives_the_same_rows_at_any_batch_size(w18_offline, photos):
    full = OnnxRuntimeRunner(w18_offline.onnx).run(photos)
    one = np.concatenate([OnnxRuntimeRunner(w18_offline.onnx).run(photos[i : i + 1]) for i in range(len(photos))])
    np.testing.assert_allclose(one, full, atol=1e-6)


def test_manifest_records_the_gate_the_weights_and_the_file(w18_offline):
    m = w18_offline.manifest
    assert m["variant"] == "HRNet_W18_C" and m["onnx_file"] == "HRNet_W18_C.onnx"
    assert m["parity"]["max_abs_dprob"] <= 1e-5 and m["parity"]["top5_identical"] is True
    assert m["parity"]["images"] == [p.name for p in sample_images()]
    assert m["weights"]["kind"] == "offline" and m["weights"]["labels_meaningful"] is False
    assert len(m["weights"]["sha256"]) == 64
    assert m["versions"]["paddlepaddle"] == "3.2.2" and m["versions"]["paddle2onnx"] == "2.1.0"
    from hrnet_build.download import sha256_file

    assert m["onnx_sha256"] == sha256_file(w18_offline.onnx)
    assert m["onnx_bytes"] == w18_offline.onnx.stat().st_size


def test_offline_weights_are_the_same_on_every_export(w18_offline):
    """The seed comes from the variant name: two exports agree (the gate's figures are repeatable)."""
    from hrnet_build.calibrate import offline_model
    from hrnet_build.weights import state_dict_sha256

    assert state_dict_sha256(offline_model(variants.get("HRNet_W18_C"))) == w18_offline.manifest["weights"]["sha256"]


def test_export_from_an_inference_model_directory_matches_the_paddle_model(w18_offline, tmp_path, photos):
    out = tmp_path / "from_dir.onnx"
    manifest = export_onnx(
        variants.get("HRNet_W18_C"), WeightsSpec.parse(str(w18_offline.paddle_dir)), out, progress=False
    )
    assert manifest.weights["kind"] == "inference_model"
    assert manifest.weights["labels_meaningful"] is True  # a real inference model is assumed trained
    np.testing.assert_allclose(
        OnnxRuntimeRunner(out).run(photos), OnnxRuntimeRunner(w18_offline.onnx).run(photos), atol=1e-6
    )


def test_interrupted_export_leaves_no_file_and_keeps_the_old_one(w18_offline, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")

    class Interrupted:
        def __init__(self, *args, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(export, "OnnxRuntimeRunner", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(variants.get("HRNet_W18_C"), WeightsSpec.parse(str(w18_offline.paddle_dir)), out, progress=False)
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_fails_before_any_work_on_a_corrupt_parity_image(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(Exception, match="broken.jpg: not a decodable image"):
        export_onnx(variants.get("HRNet_W18_C"), WeightsSpec.parse("offline"), tmp_path / "m.onnx", parity_images=[bad])
    assert not (tmp_path / "m.onnx").exists()


def test_export_rejects_an_output_path_that_is_not_onnx(tmp_path):
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(variants.get("HRNet_W18_C"), WeightsSpec.parse("offline"), tmp_path / "m.txt")


def test_cli_export_reports_weights_that_do_not_fit(tmp_path, capsys):
    import paddle

    from hrnet_build.network import build

    path = tmp_path / "w18.pdparams"
    paddle.save(build(18, False).state_dict(), str(path))
    assert (
        main(["export", "HRNet_W30_C", "--weights", str(path), "--out", str(tmp_path / "m.onnx"), "--no-progress"]) == 1
    )
    err = capsys.readouterr().err
    assert "does not fit this network" in err and "mis-shaped" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


# --- the gate itself, on constructed outputs --------------------------------------------------


def _probs(n=3, seed=0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 2, (n, 1000))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Fixed:
    """A runner that answers with fixed probabilities, for the gate's own tests."""

    def __init__(self, probs: np.ndarray, name: str = "fixed"):
        self.probs, self.name = probs, name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.probs


def _gate(expected: np.ndarray, actual: np.ndarray, names: list[str], *, offline: bool):
    batch = np.zeros((len(names), 3, 224, 224), np.float32)
    return export.gate(Fixed(expected, "reference"), Fixed(actual, "candidate"), batch, names, offline=offline)


def test_parity_passes_identical_outputs_and_reports_figures():
    p = _probs()
    report = _gate(p, p.copy(), ["a", "b", "c"], offline=True)
    assert report.max_abs_dprob == 0 and report.top5_identical and report.top1_agree == 3 and report.passed


def test_parity_fails_when_a_probability_moves_beyond_the_tolerance():
    p = _probs()
    q = p.copy()
    q[1, 10] += 2e-5
    with pytest.raises(ParityError, match="max \\|Δprob\\| 2.0.e-05"):
        _gate(p, q, ["a", "b", "c"], offline=False)


def test_parity_fails_when_the_top5_order_differs_even_within_tolerance():
    head = np.array([0.3, 0.2, 0.1 + 3e-6, 0.1, 0.05])
    row = np.full(1000, (1 - head.sum()) / 995)
    row[:5] = head
    p = np.stack([row, row]).astype(np.float32)
    q = p.copy()
    q[1, [2, 3]] = p[1, [3, 2]]  # 3e-6 apart: within tolerance, but the order of the top-5 changes
    with pytest.raises(ParityError, match="failing on \\['b'\\]"):
        _gate(p, q, ["a", "b"], offline=False)


def test_parity_rejects_outputs_that_are_not_probabilities():
    logits = np.random.default_rng(0).normal(0, 1, (2, 1000)).astype(np.float32)
    with pytest.raises(ParityError, match="not probabilities"):
        _gate(logits, logits, ["a", "b"], offline=False)


def test_parity_rejects_saturated_offline_weights():
    p = np.zeros((2, 1000), np.float32)
    p[:, 5] = 1.0
    with pytest.raises(ParityError, match="saturated"):
        _gate(p, p, ["a", "b"], offline=True)
    _gate(p, p, ["a", "b"], offline=False)  # a trained model may be this confident


def test_standardise_rejects_a_fixed_batch_dimension():
    from onnx import TensorProto, helper

    from hrnet_build.weights import Weights, WeightsKind

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["out"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1000])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 1000])],
    )
    model = helper.make_model(graph)
    with pytest.raises(ExportError, match="fixed batch size of 4"):
        export._standardise(model, variants.get("HRNet_W18_C"), Weights(WeightsKind.INFERENCE_MODEL, "t", None))


def test_manifest_path_sits_beside_the_onnx_and_reads_back_what_was_written(w18_offline, tmp_path):
    assert manifest_path(tmp_path / "HRNet_W18_C.onnx") == tmp_path / "HRNet_W18_C.onnx.json"
    m = ExportManifest.read(w18_offline.onnx)
    assert m.variant == "HRNet_W18_C" and m.parity.limits == export.GATE and m.input.dims == (-1, 3, 224, 224)
    assert json.loads(json.dumps(m.to_dict())) == w18_offline.manifest


def test_cli_classify_prints_top_k_for_the_samples_and_flags_bad_files(w18_offline, tmp_path, capsys):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    code = main(["classify", str(empty), "--samples", "--onnx", str(w18_offline.onnx), "--top-k", "3", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 2  # one image failed; the others were still classified
    assert rows[0]["image"] == str(empty) and "empty" in rows[0]["error"] and rows[0]["top"] == []
    good = rows[1:]
    assert [r["image"].rsplit("/", 1)[-1] for r in good] == [p.name for p in sample_images()]
    assert all(len(r["top"]) == 3 and r["error"] is None for r in good)
    probs = OnnxRuntimeRunner(w18_offline.onnx).run(preprocess_files(sample_images()))
    for r, row in zip(good, probs):
        assert [g["class_id"] for g in r["top"]] == list(np.argsort(-row, kind="stable")[:3])
        assert r["top"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-6)


def test_onnxruntime_session_reads_the_exported_metadata(w18_offline):
    meta = ort.InferenceSession(str(w18_offline.onnx), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["weights"] == "offline"


def test_auto_weights_export_end_to_end_through_a_mirror(tmp_path, monkeypatch):
    """--weights auto: download (from a local mirror), strict .pdparams load, export, gate."""
    import paddle

    from hrnet_build.calibrate import offline_model

    from httpfiles import FileServer

    variant = variants.get("HRNet_W18_C")
    weights_file = tmp_path / "w.pdparams"
    paddle.save(offline_model(variant, with_softmax=False).state_dict(), str(weights_file))
    payload = weights_file.read_bytes()
    with FileServer({"/legendary_models/HRNet_W18_C_pretrained.pdparams": payload}) as srv:
        monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", srv.url)
        out = tmp_path / "auto" / "HRNet_W18_C.onnx"
        # --weights defaults to auto; the table pins no hashes (docs/export.md), so the risk is accepted
        code = main(["-q", "export", "HRNet_W18_C", "--out", str(out), "--no-progress", "--allow-unpinned-weights"])
    assert code == 0
    m = json.loads(manifest_path(out).read_text())
    assert m["weights"]["kind"] == "pdparams" and m["weights"]["labels_meaningful"] is True
    assert m["weights"]["source"] == f"{srv.url}/legendary_models/HRNet_W18_C_pretrained.pdparams"
    import hashlib

    assert m["weights"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert m["parity"]["max_abs_dprob"] <= 1e-5 and m["parity"]["top5_identical"]
