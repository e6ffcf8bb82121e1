"""The TensorRT engine stage: everything that does not need TensorRT is tested here; the build
itself is marked `gpu` and skipped where TensorRT or a GPU is missing."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from hrnet_build import engine, repository
from hrnet_build.engine import Precision
from hrnet_build.repository import RepositoryOptions, Target, write_repository
from hrnet_core import release, variants
from hrnet_core.errors import EngineError, ManifestError, ParityError
from hrnet_core.manifest import PlanManifest, Profile, manifest_path
from hrnet_core.parity import ParityLimits, ParityReport
from hrnet_triton.cli import main


@pytest.mark.parametrize(
    "max_batch,expected", [(1, (1, 1, 1)), (2, (1, 1, 2)), (8, (1, 4, 8)), (32, (1, 16, 32)), (48, (1, 16, 48))]
)
def test_profile_for_max_puts_opt_at_the_middle_power_of_two(max_batch, expected):
    p = Profile.for_max(max_batch)
    assert (p.min, p.opt, p.max) == expected
    assert p.shapes()["max"] == (max_batch, 3, 224, 224)


def test_profile_opt_is_one_of_the_gpu_targets_preferred_batch_sizes():
    gpu = RepositoryOptions.for_target(Target.GPU)
    assert Profile.for_max(gpu.max_batch_size).opt in gpu.preferred_batch_sizes


@pytest.mark.parametrize("bad", [0, -3, 257])
def test_profile_rejects_a_max_batch_out_of_range(bad):
    with pytest.raises(EngineError, match="--max-batch"):
        Profile.for_max(bad)


def test_profile_rejects_disordered_shapes():
    with pytest.raises(EngineError, match="min <= opt <= max"):
        Profile(1, 16, 8)


_PARITY = ParityReport(
    reference="ONNX Runtime",
    candidate="TensorRT fp16",
    images=("a.png",),
    max_abs_dprob=1e-3,
    top1_agree=1,
    min_top5_overlap=5,
    top5_identical=True,
    min_top1_prob=0.2,
    max_top1_prob=0.2,
    limits=ParityLimits(max_abs_dprob=1e-2, min_top5_overlap=4),
)


# What `tensorrt.__version__` says inside the pinned 24.10 TensorRT container (TensorRT 10.5.0.18):
# its build.sh writes major.minor.patch into the Python bindings. Written out, not derived from the
# pin, so that a pin compared in the wrong form fails here.
TENSORRT_REPORTS = "10.5.0"


def _manifest(**over) -> PlanManifest:
    base = dict(
        variant="HRNet_W18_C",
        plan_file="HRNet_W18_C.sm75.fp16.plan",
        precision="fp16",
        profile=Profile(1, 16, 32),
        tensorrt_version=TENSORRT_REPORTS,
        gpu_name="Tesla T4",
        compute_capability="7.5",
        onnx_sha256="0" * 64,
        parity=_PARITY,
    )
    return PlanManifest(**{**base, **over})


def _built_plan(tmp_path, **manifest_over):
    """A plan file and its manifest as `engine` leaves them, for a small stand-in ONNX file."""
    from hrnet_build.download import sha256_file

    onnx = tmp_path / "HRNet_W18_C.onnx"
    onnx.write_bytes(b"an exported model")
    plan = tmp_path / "HRNet_W18_C.sm75.fp16.plan"
    plan.write_bytes(b"a serialized engine")
    m = _manifest(onnx_sha256=sha256_file(onnx), **manifest_over)
    manifest_path(plan).write_text(json.dumps(m.to_dict()))
    return onnx, plan


def _stale(plan, onnx, precision=Precision.FP16, max_batch=32, trt=TENSORRT_REPORTS, cc="7.5", gpu="Tesla T4"):
    device = engine.Device(gpu, cc)
    return engine.stale_reason(plan, onnx, precision, Profile.for_max(max_batch), tensorrt_version=trt, device=device)


def test_a_plan_built_from_the_same_onnx_for_this_gpu_and_tensorrt_is_current(tmp_path):
    onnx, plan = _built_plan(tmp_path)
    assert _stale(plan, onnx) is None


@pytest.mark.parametrize(
    "change,expected",
    [
        (dict(cc="8.6"), "compute capability 7.5, now 8.6"),
        (dict(gpu="NVIDIA GeForce RTX 2080"), "GPU Tesla T4, now NVIDIA GeForce RTX 2080"),
        (dict(trt="10.8.0"), f"TensorRT version {TENSORRT_REPORTS}, now 10.8.0"),
        (dict(precision=Precision.FP32), "precision fp16, now fp32"),
        (dict(max_batch=16), "batch profile (1, 16, 32), now (1, 8, 16)"),
    ],
    ids=["other-cc", "other-gpu-same-cc", "other-tensorrt", "other-precision", "other-profile"],
)
def test_a_plan_for_another_gpu_tensorrt_precision_or_profile_is_rebuilt(tmp_path, change, expected):
    onnx, plan = _built_plan(tmp_path)
    assert _stale(plan, onnx, **change) == f"built for {expected}"


def test_a_plan_from_a_re_exported_onnx_or_without_its_manifest_is_rebuilt(tmp_path):
    onnx, plan = _built_plan(tmp_path)
    onnx.write_bytes(b"exported again, with other weights")
    assert _stale(plan, onnx) == "built from another HRNet_W18_C.onnx (sha256 differs)"
    manifest_path(plan).write_text("{not json")
    assert "not a readable plan manifest" in _stale(plan, onnx)
    manifest_path(plan).unlink()
    assert _stale(plan, onnx) == "not built yet"


def test_cli_skip_if_current_still_needs_tensorrt_to_know_this_gpu(w18_offline, tmp_path, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    code = main(
        [
            "engine",
            "HRNet_W18_C",
            "--onnx",
            str(w18_offline.onnx),
            "--out",
            str(tmp_path / "m.plan"),
            "--skip-if-current",
        ]
    )
    assert code == 1 and "tensorrt Python module is not installed" in capsys.readouterr().err


def test_plan_manifest_round_trips_through_json(tmp_path):
    m = _manifest()
    assert m.write(tmp_path / "x.plan") == tmp_path / "x.plan.json"
    back = PlanManifest.read(tmp_path / "x.plan")
    assert back == m and isinstance(back.parity.limits, ParityLimits) and back.profile == Profile(1, 16, 32)


def test_a_manifest_of_another_kind_is_refused(tmp_path):
    (tmp_path / "x.plan.json").write_text(json.dumps({**_manifest().to_dict(), "kind": "export"}))
    with pytest.raises(ManifestError, match="not a plan manifest"):
        PlanManifest.read(tmp_path / "x.plan")


def test_plan_from_another_tensorrt_version_is_refused_with_the_reason():
    with pytest.raises(EngineError, match='TensorRT 10.3.0.*"engine plan file is not compatible".*build_plans.sh'):
        repository.check_plan_manifest(_manifest(tensorrt_version="10.3.0"))


def test_plan_built_by_the_pinned_tensorrt_is_accepted_as_tensorrt_reports_its_version():
    """The pinned release is TensorRT 10.5.0.18, whose Python bindings say "10.5.0": the manifest
    written in that container must pass the check (it failed every real plan before)."""
    assert release.TENSORRT_VERSION == "10.5.0.18"
    repository.check_plan_manifest(_manifest(tensorrt_version="10.5.0"))


def test_unreadable_plan_manifest_says_to_rebuild(tmp_path):
    path = tmp_path / "x.plan.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="build the file again with `hrnet-triton engine`"):
        PlanManifest.read(path)


def test_onnx_without_a_dynamic_batch_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["probabilities"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 3, 224, 224])],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(EngineError, match="batch dimension is fixed at 1"):
        engine.check_onnx_dynamic_batch(path)


def test_exported_onnx_has_the_dynamic_batch_a_profile_needs(w18_offline):
    assert engine.check_onnx_dynamic_batch(w18_offline.onnx) == "batch"


def test_fp16_parity_allows_a_swap_below_top1_but_not_a_new_top1():
    probs = np.full((2, 1000), 0.5 / 995, np.float32)
    probs[:, :6] = [0.2, 0.12, 0.08, 0.06, 0.04, 0.0399]
    swapped = probs.copy()
    swapped[1, [4, 5]] = swapped[1, [5, 4]]  # near-equal 5th and 6th swap, as FP16 rounding can: overlap 4/5
    report = engine.plan_parity(probs, swapped, ["a", "b"], Precision.FP16)
    assert report.min_top5_overlap == 4 and report.top1_agree == 2 and report.passed
    with pytest.raises(ParityError, match="the fp32 plan was not written"):
        engine.plan_parity(probs, swapped, ["a", "b"], Precision.FP32)
    new_top1 = probs.copy()
    new_top1[0, [0, 1]] = new_top1[0, [1, 0]]
    with pytest.raises(ParityError, match="failing on \\['a'\\]"):
        engine.plan_parity(probs, new_top1, ["a", "b"], Precision.FP16)


def test_gpu_repository_installs_one_plan_per_architecture(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    for cc, mx in (("7.5", 32), ("8.6", 16)):
        name = f"HRNet_W18_C.sm{cc.replace('.', '')}.fp16.plan"
        (plans / name).write_bytes(b"plan for " + cc.encode())
        (plans / f"{name}.json").write_text(
            json.dumps(_manifest(plan_file=name, compute_capability=cc, profile=Profile.for_max(mx)).to_dict())
        )
    write_repository(Target.GPU, [variants.get("HRNet_W18_C")], tmp_path / "repo", plans_dir=plans)
    model = tmp_path / "repo" / "HRNet_W18_C"
    cfg = text_format.Parse((model / "config.pbtxt").read_text(), pb.ModelConfig())
    assert dict(cfg.cc_model_filenames) == {"7.5": "model_cc75.plan", "8.6": "model_cc86.plan"}
    assert cfg.max_batch_size == 16  # the smallest profile maximum: every plan must accept every batch
    assert max(cfg.dynamic_batching.preferred_batch_size) <= 16
    assert all(s.batch_size <= 16 for s in cfg.optimization.cuda.graph_spec)
    assert (model / "1" / "model_cc86.plan").read_bytes() == b"plan for 8.6"


def test_gpu_repository_refuses_a_plan_of_another_tensorrt_version(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "a.plan").write_bytes(b"x")
    (plans / "a.plan.json").write_text(json.dumps(_manifest(plan_file="a.plan", tensorrt_version="8.6.1").to_dict()))
    with pytest.raises(EngineError, match="engine plan file is not compatible"):
        write_repository(Target.GPU, [variants.get("HRNet_W18_C")], tmp_path / "repo", plans_dir=plans)


def test_cli_engine_without_tensorrt_names_the_container_command(w18_offline, tmp_path, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    code = main(["engine", "HRNet_W18_C", "--onnx", str(w18_offline.onnx), "--out", str(tmp_path / "m.plan")])
    err = capsys.readouterr().err
    assert code == 1
    assert release.TENSORRT_IMAGE in err and "build/build_plans.sh" in err
    assert not (tmp_path / "m.plan").exists()


def test_cli_engine_reports_a_missing_onnx(tmp_path, capsys):
    assert (
        main(["engine", "HRNet_W18_C", "--onnx", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "m.plan")]) == 1
    )
    assert "no such ONNX model" in capsys.readouterr().err


def _has_tensorrt_and_gpu() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt module is not installed (no package registry serves the TensorRT builder; docs/facts.md)"
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver/GPU on this machine"
    return None


GPU_ONNX_ENV = "HRNET_TRITON_GPU_TEST_ONNX"


def _exported_w18_for_gpu_tests() -> Path:
    """Where plans are built (the TensorRT container) there is no paddle to export with: the GPU
    tests take an ONNX model exported elsewhere, named by an environment variable."""
    onnx = os.environ.get(GPU_ONNX_ENV)
    if not onnx or not Path(onnx).is_file():
        pytest.skip(
            f"set {GPU_ONNX_ENV} to an HRNet_W18_C.onnx made by `hrnet-triton export HRNet_W18_C --weights offline "
            "--out HRNet_W18_C.onnx` on any machine"
        )
    return Path(onnx)


@pytest.mark.gpu
@pytest.mark.skipif(_has_tensorrt_and_gpu() is not None, reason=str(_has_tensorrt_and_gpu()))
@pytest.mark.parametrize("precision", list(Precision), ids=lambda p: p.value)
def test_engine_builds_a_plan_that_matches_onnxruntime(tmp_path, precision):
    onnx = _exported_w18_for_gpu_tests()
    result = engine.engine(variants.get("HRNet_W18_C"), onnx, plans_dir=tmp_path, precision=precision, max_batch=8)
    m = result.manifest
    assert result.built and result.path.stat().st_size > 0 and result.path.parent == tmp_path
    assert m.tensorrt_version == release.TENSORRT_PYTHON_VERSION  # what the manifest check compares with
    again = engine.engine(
        variants.get("HRNet_W18_C"), onnx, plans_dir=tmp_path, precision=precision, max_batch=8, skip_if_current=True
    )
    assert not again.built and again.path == result.path
    assert m.parity.passed and m.parity.min_top5_overlap >= engine.PARITY[precision].min_top5_overlap
    assert m.profile == Profile(1, 4, 8)


def test_repo_max_batch_above_the_plans_profile_is_an_error(tmp_path, capsys):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "a.plan").write_bytes(b"x")
    (plans / "a.plan.json").write_text(json.dumps(_manifest(plan_file="a.plan", profile=Profile.for_max(16)).to_dict()))
    args = [
        "repo",
        "--target",
        "gpu",
        "--variants",
        "HRNet_W18_C",
        "--plans-dir",
        str(plans),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*args, "--max-batch", "32"]) == 1
    assert (
        "--max-batch 32 is above the optimisation profile of the HRNet_W18_C plans (max 16)" in capsys.readouterr().err
    )
    assert main([*args, "--max-batch", "8"]) == 0
    cfg = text_format.Parse((tmp_path / "r" / "HRNet_W18_C" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.max_batch_size == 8
