"""The GPU path without a GPU: every defect found by reading it against TensorRT 10.5 and Triton
r24.10 that can be shown here, and the parts of the first-run script that run without a GPU.

The build itself is `gpu`-marked in tests/test_engine.py and runs where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from hrnet_build import engine
from hrnet_build.engine import Device, Precision
from hrnet_build.repository import Target, write_repository
from hrnet_core import release, variants
from hrnet_core.errors import EngineError
from hrnet_core.manifest import PlanManifest, Profile
from hrnet_core.parity import ParityLimits, ParityReport

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
W18 = variants.get("HRNet_W18_C")
_PARITY = ParityReport(
    reference="ONNX Runtime", candidate="TensorRT fp16", images=("a.png",), max_abs_dprob=1e-3, top1_agree=1,
    min_top5_overlap=5, top5_identical=True, min_top1_prob=0.2, max_top1_prob=0.2,
    limits=ParityLimits(max_abs_dprob=1e-2, min_top5_overlap=4),
)  # fmt: skip


def _plan(plans: Path, cc: str, precision: str, *, profile_max: int = 32, gpu: str = "Tesla T4") -> Path:
    name = f"HRNet_W18_C.sm{cc.replace('.', '')}.{precision}.plan"
    (plans / name).write_bytes(f"{precision} plan for {cc}".encode())
    PlanManifest(
        variant="HRNet_W18_C", plan_file=name, precision=precision, profile=Profile.for_max(profile_max),
        tensorrt_version=release.TENSORRT_PYTHON_VERSION, gpu_name=gpu, compute_capability=cc,
        onnx_sha256="0" * 64, parity=_PARITY,
    ).write(plans / name)  # fmt: skip
    return plans / name


def _config(repo: Path) -> pb.ModelConfig:
    return text_format.Parse((repo / "HRNet_W18_C" / "config.pbtxt").read_text(), pb.ModelConfig())


# -- the repository stage ------------------------------------------------------------------------


def test_repo_installs_the_chosen_precision_when_plans_of_another_are_left_on_the_volume(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    _plan(plans, "7.5", "fp32")  # built before a change of precision, still there
    _plan(plans, "7.5", "fp16")
    write_repository(Target.GPU, [W18], tmp_path / "fp16", plans_dir=plans)
    assert (tmp_path / "fp16" / "HRNet_W18_C" / "1" / "model_cc75.plan").read_bytes() == b"fp16 plan for 7.5"
    write_repository(Target.GPU, [W18], tmp_path / "fp32", plans_dir=plans, precision="fp32")
    assert (tmp_path / "fp32" / "HRNet_W18_C" / "1" / "model_cc75.plan").read_bytes() == b"fp32 plan for 7.5"


def test_repo_default_plan_is_the_newest_architecture_compared_as_numbers(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    for cc in ("8.6", "10.0", "7.5"):
        _plan(plans, cc, "fp16")
    write_repository(Target.GPU, [W18], tmp_path / "repo", plans_dir=plans)
    cfg = _config(tmp_path / "repo")
    assert cfg.default_model_filename == "model_cc100.plan"  # as strings, "8.6" > "10.0"
    assert dict(cfg.cc_model_filenames) == {
        "7.5": "model_cc75.plan",
        "8.6": "model_cc86.plan",
        "10.0": "model_cc100.plan",
    }


# -- the engine stage's pieces around TensorRT ---------------------------------------------------


class _TensorRTConfig:
    """Stands in for tensorrt.IBuilderConfig's timing-cache calls (TensorRT cannot be installed
    here): a cache whose bytes start with b"foreign" is refused, as TensorRT refuses a cache from
    another version or device (set_timing_cache returns False)."""

    def __init__(self, final_cache: bytes | None = b"new cache"):
        self.set_with: list[bytes] = []
        self.final_cache = final_cache

    def create_timing_cache(self, data: bytes) -> bytes:
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # a cache from another device must not be forced in
        self.set_with.append(cache)
        return not cache.startswith(b"foreign")

    def get_timing_cache(self):
        if self.final_cache is None:
            return None
        data = self.final_cache
        return type("Cache", (), {"serialize": lambda self: data})()


def test_timing_cache_that_tensorrt_refuses_is_replaced_by_a_new_one_and_said_so(tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"foreign: built by TensorRT 10.3 on an A10")
    config = _TensorRTConfig()
    with caplog.at_level(logging.WARNING):
        assert engine.use_timing_cache(config, cache) is False
    assert config.set_with == [b"foreign: built by TensorRT 10.3 on an A10", b""]
    assert "refused the timing cache" in caplog.text
    assert engine.use_timing_cache(_TensorRTConfig(), tmp_path / "absent.cache") is False
    cache.write_bytes(b"ours")
    assert engine.use_timing_cache(_TensorRTConfig(), cache) is True


def test_a_build_whose_timing_cache_comes_back_empty_keeps_the_cache_file_and_goes_on(tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"previous")
    with caplog.at_level(logging.WARNING):
        engine.save_timing_cache(_TensorRTConfig(final_cache=None), cache)  # TensorRT returned None
    assert cache.read_bytes() == b"previous" and "returned no timing cache" in caplog.text
    engine.save_timing_cache(_TensorRTConfig(final_cache=b"after"), cache)
    assert cache.read_bytes() == b"after"


def test_timing_caches_and_plans_are_named_by_tensorrt_version_and_gpu_model(tmp_path):
    t4, rtx = Device("Tesla T4", "7.5"), Device("NVIDIA GeForce RTX 2080", "7.5")
    assert engine.timing_cache_path(tmp_path, "10.5.0", t4).name == "timing.trt10.5.0.tesla-t4.cache"
    assert engine.timing_cache_path(tmp_path, "10.5.0", t4) != engine.timing_cache_path(tmp_path, "10.5.0", rtx)
    assert engine.timing_cache_path(tmp_path, "10.5.0", t4) != engine.timing_cache_path(tmp_path, "10.8.0", t4)
    assert engine.plan_path(tmp_path, "HRNet_W18_C", t4, Precision.FP16).name == "HRNet_W18_C.sm75.fp16.plan"


def test_a_gpu_older_than_volta_is_refused_with_what_to_do():
    with pytest.raises(EngineError, match="compute capability 6.1; TensorRT 10.5.0.18 builds plans for 7.0"):
        engine.require_supported(Device("Tesla P4", "6.1"))
    assert engine.require_supported(Device("Tesla V100-SXM2-16GB", "7.0")).cc == "7.0"


@pytest.fixture(scope="module")
def fake_cuda(tmp_path_factory) -> Path:
    """A stand-in libcuda.so.1 (tests/data/fake_cuda.c) answering the driver calls gpu_device makes,
    with results set by FAKE_CUDA_* variables: the error paths of a real driver cannot be provoked here."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the stand-in CUDA driver library")
    out = tmp_path_factory.mktemp("cuda")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(out / "libcuda.so.1"), str(ROOT / "tests/data/fake_cuda.c")], check=True
    )
    return out


def _gpu_device(fake_cuda: Path, **fake: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LD_LIBRARY_PATH": str(fake_cuda), **{f"FAKE_CUDA_{k.upper()}": v for k, v in fake.items()}}
    env.pop("CUDA_DEVICE_ORDER", None)
    code = "import os; from hrnet_build.engine import gpu_device; print(gpu_device(), os.environ['CUDA_DEVICE_ORDER'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_gpu_device_reads_name_and_compute_capability_in_pci_bus_order(fake_cuda):
    run = _gpu_device(fake_cuda, name="Tesla T4", major="7", minor="5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "Device(name='Tesla T4', cc='7.5') PCI_BUS_ID"


@pytest.mark.parametrize(
    "fake,message",
    [
        (dict(init="100"), "failed to initialise (cuInit): error 100 (CUDA_ERROR_NO_DEVICE)"),
        (dict(count="0"), "failed to open device 0 (cuDeviceGet): error 101 (CUDA_ERROR_INVALID_DEVICE)"),
        (dict(major="6", minor="1", name="Tesla P4"), "Tesla P4 has compute capability 6.1"),
    ],
    ids=["no-device", "device-missing", "pascal"],
)
def test_gpu_device_reports_each_cuda_driver_failure(fake_cuda, fake, message):
    run = _gpu_device(fake_cuda, **fake)
    assert run.returncode != 0 and message in run.stderr


# -- the scripts ---------------------------------------------------------------------------------


def test_build_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in BUILD.glob("*.sh"))
    run = subprocess.run([str(Path(sys.executable).with_name("shellcheck")), *scripts], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert len(scripts) == 3


def test_plans_in_container_reads_the_gpu_from_the_driver_not_nvidia_smi(w18_offline, tmp_path):
    """Without nvidia-smi's compute_cap field (R470 drivers) the old script aborted before building;
    now the first thing to fail here is the engine stage's own TensorRT check."""
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MODELS": "HRNet_W18_C", "HOME": str(tmp_path)}
    onnx_dir = w18_offline.onnx.parent
    run = subprocess.run(["bash", str(BUILD / "plans_in_container.sh"), str(onnx_dir), str(tmp_path / "plans")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1
    assert "nvidia-smi" not in run.stderr and "tensorrt Python module is not installed" in run.stderr


def test_build_plans_copies_only_the_sources_and_installs_the_pinned_engine_packages(tmp_path):
    """build_plans.sh under a stand-in `docker` that records its arguments (no Docker here)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$DOCKER_ARGS"\n')
    (fake / "docker").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "DOCKER_ARGS": str(tmp_path / "args")}
    run = subprocess.run(
        ["bash", str(BUILD / "build_plans.sh"), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text()
    assert f"{ROOT}:/src:ro" in args and release.TENSORRT_IMAGE in args
    script = args.split("-c\n", 1)[1]
    assert "python3 -m pip install" in script and "-c /src/build/engine-constraints.txt" in script
    assert "cp -r /src " not in script  # the whole checkout, .venv and artifacts included
    copied = script.split("cp -r", 1)[1].split("/tmp/hrnet-triton/")[0].replace("\\", " ").split()
    assert "/src/pyproject.toml" in copied and "/src/core" in copied
    assert all((ROOT / p.removeprefix("/src/")).exists() and ".venv" not in p and "artifacts" not in p for p in copied)


def test_engine_packages_resolve_with_numpy_1_for_the_containers_python_310(tmp_path):
    """The TensorRT 24.10 container has Python 3.10 and numpy 1.x: the engine extra with
    build/engine-constraints.txt must resolve there without numpy 2 (a dry run against PyPI)."""
    platforms = [f"--platform=manylinux_2_{v}_x86_64" for v in range(35, 16, -1)]
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), "--ignore-installed",
         "--python-version", "3.10.12",  # Ubuntu 22.04 (the container) has 3.10.12
         *platforms, "--implementation", "cp", "--only-binary=:all:",
         "--target", str(tmp_path / "t"), "-c", str(BUILD / "engine-constraints.txt"), f"{ROOT}[engine]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if run.returncode != 0 and ("Could not fetch" in run.stderr or "Network is unreachable" in run.stderr):
        pytest.skip(f"no package registry reachable: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    installed = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert installed["numpy"].startswith("1.") and installed["tritonclient"] == release.TRITON_VERSION
    assert "paddlepaddle" not in installed and "locust" not in installed


def test_gpu_check_reports_the_served_answers_against_onnxruntime(cpu_server, w18_offline, tmp_path, capsys):
    """The first-run report's checks that need no GPU, against the cpu target's real server."""
    from hrnet_triton import gpu_check

    plans = tmp_path / "plans"
    plans.mkdir()
    _plan(plans, "7.5", "fp32")
    info = tmp_path / "tensorrt.txt"
    info.write_text(
        "ii  libnvinfer10  10.5.0.18-1+cuda12.6  amd64  TensorRT runtime libraries\ntensorrt.__version__=10.5.0\n"
    )
    args = ["--url", cpu_server.http_url, "--grpc-port", str(cpu_server.ports.grpc), "--onnx", str(w18_offline.onnx)]
    args += ["--plans", str(plans), "--tensorrt-info", str(info)]
    code = gpu_check.main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tensorrt.__version__ 10.5.0; pinned 10.5.0.18" in out
    assert "Triton HTTP vs ONNX Runtime on 7 photographs" in out and "Triton GRPC vs ONNX Runtime" in out
    assert "throughput: not measured" in out and out.rstrip().endswith("verdict: PASS")
    info.write_text("ii  libnvinfer10  10.3.0.26-1+cuda12.5  amd64  TensorRT\ntensorrt.__version__=10.3.0\n")
    assert gpu_check.main(args) == 1
    assert capsys.readouterr().out.rstrip().endswith("verdict: FAIL")
