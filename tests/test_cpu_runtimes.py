"""The CPU runtimes (docs/cpu-speed.md): OpenVINO by default, ONNX Runtime as an option, FP32 or BF16.

Configs are checked with Triton's protobuf; the gate runs OpenVINO and ONNX Runtime for real on
the exported HRNet_W18_C; served answers come from a real Triton running each runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as pb

from hrnet_build import cpu_gate
from hrnet_build.repository import (
    RepositoryOptions,
    Target,
    config_text,
    model_config,
    options_from_config,
    parse_config,
    write_repository,
)
from hrnet_client.triton import TritonClassifier
from hrnet_core import variants
from hrnet_core.errors import HrnetTritonError, ParityError
from hrnet_core.parity import parity_batch
from hrnet_core.runtime import OnnxRuntimeRunner, OpenVinoRunner, cpu_runner, native_bf16
from hrnet_core.samples import sample_images

W18 = variants.get("HRNet_W18_C")


def _options(target: Target, **overrides) -> RepositoryOptions:
    return RepositoryOptions.for_target(target).override(**overrides)


def test_cpu_target_runs_openvino_fp32_by_default_and_says_so_in_its_config():
    cfg = model_config(W18, Target.CPU)
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert cfg.backend == "python"
    assert (params["runtime"], params["precision"], params["runtime_threads"]) == ("openvino", "fp32", "1")


def test_onnx_target_uses_tritons_openvino_backend_with_its_own_keys():
    cfg = model_config(W18, Target.ONNX, _options(Target.ONNX, threads=4, precision="bf16"))
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert cfg.backend == "openvino" and cfg.default_model_filename == "model.onnx"
    assert params["INFERENCE_NUM_THREADS"] == "4" and params["NUM_STREAMS"] == "1"
    assert params["HINT_BF16"] == "YES" and params["precision"] == "bf16"
    assert "HINT_BF16" not in model_config(W18, Target.ONNX).parameters  # fp32 by default


def test_gpu_instances_of_the_onnx_target_fall_back_to_onnxruntime():
    cfg = model_config(W18, Target.ONNX, _options(Target.ONNX, instance_kind="gpu"))
    assert cfg.backend == "onnxruntime" and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    with pytest.raises(HrnetTritonError, match="openvino runtime serves CPU instances"):
        _options(Target.ONNX, instance_kind="gpu", runtime="openvino")


def test_bf16_needs_openvino():
    with pytest.raises(HrnetTritonError, match="onnxruntime runs at fp32, not bf16; bf16 needs the openvino runtime"):
        _options(Target.CPU, runtime="onnxruntime", precision="bf16")
    with pytest.raises(HrnetTritonError, match="unknown CPU runtime 'tvm'"):
        _options(Target.CPU, runtime="tvm")


@pytest.mark.parametrize("target", [Target.CPU, Target.ONNX], ids=lambda t: t.value)
@pytest.mark.parametrize("runtime,precision", [("openvino", "bf16"), ("onnxruntime", "fp32")])
def test_runtime_and_precision_survive_the_round_trip(target, runtime, precision):
    options = _options(target, runtime=runtime, precision=precision, threads=3)
    parsed = options_from_config(parse_config(config_text(model_config(W18, target, options))))
    assert parsed == options


def test_openvino_fp32_is_within_the_float32_floor_of_onnx_runtime(w18_offline):
    report = cpu_gate.gate(w18_offline.onnx, "fp32")
    assert report.passed and report.top1_agree == len(sample_images())
    assert report.max_abs_dprob <= cpu_gate.LIMITS["fp32"].max_abs_dprob


NEEDS_BF16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native BF16 (AVX512_BF16 or AMX)")


@NEEDS_BF16
def test_the_bf16_gate_measures_the_drift_and_refuses_a_changed_top1(w18_offline):
    """Offline weights give flat probabilities (top-1 0.02-0.15) whose top-1 margins on some
    photographs are smaller than BF16's drift: the gate must then refuse, naming them, and write
    nothing. Trained weights' margins are far wider (docs/cpu-speed.md)."""
    photos = sample_images()
    batch = parity_batch(photos, "tensor")
    reference = OnnxRuntimeRunner(w18_offline.onnx).run(batch)
    bf16 = OpenVinoRunner(w18_offline.onnx, precision="bf16").run(batch)
    flipped = [p.name for p, r, c in zip(photos, reference, bf16) if r.argmax() != c.argmax()]
    drift = float(np.abs(reference - bf16).max())
    assert 1e-4 < drift < 0.1  # BF16 really ran (FP32 stays under 3e-5), and stayed near
    if not flipped:
        assert cpu_gate.gate(w18_offline.onnx, "bf16").passed
        return
    out = w18_offline.onnx.parent / "bf16-repo"
    with pytest.raises(ParityError, match=f"failing on .*{flipped[0]}") as err:
        options = _options(Target.CPU, precision="bf16")
        write_repository(Target.CPU, [W18], out, options, onnx_dir=w18_offline.onnx.parent, kinds=["tensor"])
    assert "bf16 model HRNet_W18_C.onnx was not written" in str(err.value)
    assert not (out / "HRNet_W18_C" / "config.pbtxt").exists()


@pytest.mark.skipif(native_bf16(), reason="this CPU has native BF16; the refusal needs a CPU without it")
def test_bf16_is_refused_on_a_cpu_without_native_bf16(w18_offline):
    with pytest.raises(HrnetTritonError, match="no native BF16"):
        OpenVinoRunner(w18_offline.onnx, precision="bf16")


@pytest.mark.parametrize(
    "runtime,precision,atol",
    [("onnxruntime", "fp32", 1e-5), pytest.param("openvino", "bf16", 0.1, marks=NEEDS_BF16)],
    ids=["ort-fp32", "ov-bf16"],
)
def test_each_runtime_is_served_and_answers_like_it_does_in_process(
    w18_offline, serve_env, free_ports, tmp_path, runtime, precision, atol
):
    from hrnet_triton.server import LocalTritonServer

    options = _options(Target.CPU, runtime=runtime, precision=precision)
    # gate=False: offline weights fail the BF16 gate (above); the config then says it was not checked
    onnx_dir = w18_offline.onnx.parent
    write_repository(Target.CPU, [W18], tmp_path / "repo", options, onnx_dir=onnx_dir, kinds=["tensor"], gate=False)
    cfg = parse_config((tmp_path / "repo" / "HRNet_W18_C" / "config.pbtxt").read_text())
    if runtime == "openvino":
        assert cfg.parameters["parity"].string_value.startswith("not checked")
    batch = parity_batch(sample_images()[:4], "tensor")
    expected = cpu_runner(w18_offline.onnx, runtime, precision=precision).run(batch)
    reference = OnnxRuntimeRunner(w18_offline.onnx).run(batch)
    with LocalTritonServer(
        tmp_path / "repo", serve_env=serve_env, ports=free_ports(), log_file=tmp_path / "t.log"
    ) as srv:
        with TritonClassifier(srv.http_url, "HRNet_W18_C", input="tensor") as clf:
            served = clf.run(batch)
    np.testing.assert_allclose(served, expected, atol=1e-5)  # the server runs the very runner
    assert np.abs(served - reference).max() <= atol
