"""Thin clients (docs/inputs.md): each variant served three ways, and bad images on the server side.

The configs are checked with Triton's protobuf; everything else runs against a real Triton: the
shared ``cpu_server`` (``<V>``, ``<V>_uint8`` when the export wrote it, ``<V>_image`` and
``hrnet_preprocess``), and for the dynamic-batch test a server of this module whose
``hrnet_preprocess`` waits until a whole batch of requests is there.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as pb
from tritonclient.utils import InferenceServerException

import hrnet_core
from hrnet_build.config import DECODE_THREADS_PARAMETER, MAX_PIXELS_PARAMETER
from hrnet_build.repository import (
    InstanceKind,
    RepositoryOptions,
    Target,
    config_text,
    options_from_config,
    parse_config,
    preprocess_config,
    write_repository,
)
from hrnet_core import release, variants
from hrnet_core.contract import (
    ADMIN_HEADER,
    DEFAULT_PREPROCESS,
    INPUT_KIND_PARAMETER,
    MAX_PIXELS,
    PREPROCESS_MODEL,
    PreprocessConfig,
    model_name,
    triton_parameters,
)
from hrnet_core.errors import HrnetTritonError
from hrnet_core.labels import imagenet_labels
from hrnet_core.manifest import PlanManifest, Profile
from hrnet_core.parity import ParityLimits, ParityReport
from hrnet_core.preprocess import load_crop, load_tensor
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_triton.server import LocalTritonServer

W18 = variants.get("HRNet_W18_C")
IMAGE_MODEL = model_name(W18.name, "image")


def _jpeg() -> bytes:
    return next(p for p in sample_images() if p.suffix == ".jpg").read_bytes()


def _png(height: int, width: int) -> bytes:
    ok, data = cv2.imencode(".png", np.full((height, width, 3), 128, np.uint8))
    assert ok
    return data.tobytes()


# -- configs ---------------------------------------------------------------------------------------


def _configs(root: Path) -> dict[str, pb.ModelConfig]:
    return {d.name: parse_config((d / "config.pbtxt").read_text()) for d in root.iterdir() if d.is_dir()}


@pytest.mark.parametrize("target", list(Target), ids=lambda t: t.value)
def test_each_variant_is_served_three_ways_and_every_config_states_its_input_kind(target, tmp_path):
    write_repository(target, [W18], tmp_path)
    cfgs = _configs(tmp_path)
    assert sorted(cfgs) == sorted([W18.name, f"{W18.name}_uint8", IMAGE_MODEL, PREPROCESS_MODEL])
    kinds = {name: triton_parameters(cfg)[INPUT_KIND_PARAMETER] for name, cfg in cfgs.items()}
    assert kinds == {W18.name: "tensor", f"{W18.name}_uint8": "uint8", IMAGE_MODEL: "image", PREPROCESS_MODEL: "image"}
    for cfg in cfgs.values():
        assert PreprocessConfig.from_triton_config(cfg) == DEFAULT_PREPROCESS
    (x,) = cfgs[W18.name].input
    assert (x.data_type, list(x.dims), x.format) == (pb.TYPE_FP32, [3, 224, 224], pb.ModelInput.FORMAT_NCHW)
    (u,) = cfgs[f"{W18.name}_uint8"].input
    assert (u.name, u.data_type, list(u.dims), u.format) == (
        "x",
        pb.TYPE_UINT8,
        [224, 224, 3],
        pb.ModelInput.FORMAT_NHWC,
    )
    assert [w.inputs["x"].data_type for w in cfgs[f"{W18.name}_uint8"].model_warmup] == [pb.TYPE_UINT8] * 2


def test_the_ensemble_decodes_then_classifies_with_the_tensor_models_batch_and_labels(tmp_path):
    options = RepositoryOptions.for_target(Target.ONNX).override(max_batch=4)
    write_repository(Target.ONNX, [W18, variants.get("HRNet_W30_C")], tmp_path, options)
    cfgs = _configs(tmp_path)
    ens = cfgs[IMAGE_MODEL]
    assert ens.platform == "ensemble" and ens.max_batch_size == cfgs[W18.name].max_batch_size == 4
    (image,), (out,) = ens.input, ens.output
    assert (image.name, image.data_type, list(image.dims)) == ("image", pb.TYPE_STRING, [1])
    assert (out.name, out.data_type, list(out.dims), out.label_filename) == (
        "probabilities",
        pb.TYPE_FP32,
        [1000],
        "labels.txt",
    )
    assert (tmp_path / IMAGE_MODEL / "labels.txt").read_text() == (tmp_path / W18.name / "labels.txt").read_text()
    assert (tmp_path / IMAGE_MODEL / "1").is_dir()  # Triton loads no ensemble without a version
    steps = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in ens.ensemble_scheduling.step]
    assert steps == [
        (PREPROCESS_MODEL, {"image": "image"}, {"x": "x"}),
        (W18.name, {"x": "x"}, {"probabilities": "probabilities"}),
    ]
    pre = cfgs[PREPROCESS_MODEL]
    assert pre.backend == "python" and pre.max_batch_size == 4  # the largest of the models it feeds
    (image,), (x,) = pre.input, pre.output
    assert (image.data_type, list(image.dims), x.data_type, list(x.dims)) == (
        pb.TYPE_STRING,
        [1],
        pb.TYPE_FP32,
        [3, 224, 224],
    )
    assert triton_parameters(pre)[MAX_PIXELS_PARAMETER] == str(MAX_PIXELS)
    source = Path(__file__).parents[1] / "build" / "hrnet_build" / "triton_preprocess_model.py"
    assert (tmp_path / PREPROCESS_MODEL / "1" / "model.py").read_text() == source.read_text()


@pytest.mark.parametrize("target", list(Target), ids=lambda t: t.value)
def test_preprocess_options_survive_the_round_trip_and_default_to_one_instance_on_the_cpu_target(target):
    options = RepositoryOptions(8, (4,), 500, 9, 1_000_000, 3, InstanceKind.CPU, threads=2)
    cfg = parse_config(config_text(preprocess_config(target, options, max_pixels=1000)))
    assert options_from_config(cfg) == options
    assert (
        triton_parameters(cfg)[DECODE_THREADS_PARAMETER] == "2"
        and triton_parameters(cfg)[MAX_PIXELS_PARAMETER] == "1000"
    )
    default = RepositoryOptions.for_preprocess(target)
    assert options_from_config(preprocess_config(target)) == default
    assert default.instance_kind is InstanceKind.CPU
    if target is Target.CPU:  # docs/inputs.md: decoding is ~5% of the classifier's time on 2 cores
        assert (default.instances, default.threads) == (1, 1)


def test_a_uint8_model_is_written_where_its_onnx_model_is(tmp_path):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / f"{W18.name}.onnx").write_bytes(b"float model")
    # placeholders, not models: gate=False keeps OpenVINO's parity gate (tests/test_cpu_runtimes.py) off them
    write_repository(Target.CPU, [W18], tmp_path / "float-only", onnx_dir=onnx_dir, gate=False)
    assert not (tmp_path / "float-only" / f"{W18.name}_uint8").exists()
    assert (tmp_path / "float-only" / IMAGE_MODEL / "config.pbtxt").is_file()
    (onnx_dir / f"{W18.name}_uint8.onnx").write_bytes(b"uint8 model")
    write_repository(Target.CPU, [W18], tmp_path / "both", onnx_dir=onnx_dir, gate=False)
    version = tmp_path / "both" / f"{W18.name}_uint8" / "1"
    assert (version / "model.onnx").read_bytes() == b"uint8 model"
    assert (version / "model.py").read_text() == (tmp_path / "both" / W18.name / "1" / "model.py").read_text()


def test_only_the_input_kinds_asked_for_are_written(tmp_path):
    write_repository(Target.ONNX, [W18], tmp_path / "tensor", kinds=("tensor",))
    assert sorted(_configs(tmp_path / "tensor")) == [W18.name]  # no ensemble, no preprocessing model
    write_repository(Target.ONNX, [W18], tmp_path / "image", kinds=("tensor", "image"))
    assert sorted(_configs(tmp_path / "image")) == sorted([W18.name, IMAGE_MODEL, PREPROCESS_MODEL])
    with pytest.raises(HrnetTritonError, match="image needs tensor, the model its ensemble runs"):
        write_repository(Target.ONNX, [W18], tmp_path / "bad", kinds=("image",))
    with pytest.raises(HrnetTritonError, match="choose among tensor, uint8, image"):
        write_repository(Target.ONNX, [W18], tmp_path / "bad", kinds=("float",))


def _plan(plans: Path, kind: str) -> None:
    name = f"{model_name(W18.name, kind)}.sm75.fp16.plan"
    (plans / name).write_bytes(f"{kind} plan".encode())
    parity = ParityReport(
        reference="ONNX Runtime", candidate="TensorRT fp16", images=("a.png",), max_abs_dprob=1e-3, top1_agree=1,
        min_top5_overlap=5, top5_identical=True, min_top1_prob=0.2, max_top1_prob=0.2,
        limits=ParityLimits(max_abs_dprob=1e-2, min_top5_overlap=4),
    )  # fmt: skip
    PlanManifest(
        variant=W18.name, plan_file=name, precision="fp16", profile=Profile.for_max(32),
        tensorrt_version=release.TENSORRT_PYTHON_VERSION, gpu_name="Tesla T4", compute_capability="7.5",
        onnx_sha256="0" * 64, parity=parity, input_kind=kind,
    ).write(plans / name)  # fmt: skip


def test_gpu_uint8_model_gets_the_plans_whose_manifest_says_uint8(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    _plan(plans, "tensor")
    write_repository(Target.GPU, [W18], tmp_path / "tensor-only", plans_dir=plans)
    assert not (tmp_path / "tensor-only" / f"{W18.name}_uint8").exists()  # Triton could not load it
    _plan(plans, "uint8")
    write_repository(Target.GPU, [W18], tmp_path / "both", plans_dir=plans)
    assert (tmp_path / "both" / W18.name / "1" / "model_cc75.plan").read_bytes() == b"tensor plan"
    assert (tmp_path / "both" / f"{W18.name}_uint8" / "1" / "model_cc75.plan").read_bytes() == b"uint8 plan"


# -- a real server: the image ensemble -------------------------------------------------------------


def _client(server: LocalTritonServer, protocol: str):
    if protocol == "http":
        return httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{server.ports.http}")
    return grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")


def _infer_images(server: LocalTritonServer, blobs: list[bytes], protocol: str = "http", class_count: int = 0):
    module, client = _client(server, protocol)
    data = np.array(blobs, dtype=object).reshape(-1, 1)
    image = module.InferInput("image", list(data.shape), "BYTES")
    image.set_data_from_numpy(data)
    wanted = module.InferRequestedOutput("probabilities", class_count=class_count)
    try:
        return client.infer(IMAGE_MODEL, [image], outputs=[wanted]).as_numpy("probabilities")
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference(w18_offline) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(w18_offline.onnx)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_image_ensemble_equals_onnx_runtime_on_the_clients_tensors(cpu_server, reference, protocol):
    paths = sample_images()
    got = _infer_images(cpu_server, [p.read_bytes() for p in paths], protocol)
    expected = reference.run(np.stack([load_tensor(p) for p in paths]))
    assert got.shape == (len(paths), 1000)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classification_extension_returns_labels_through_the_ensemble(cpu_server, reference, protocol):
    paths = sample_images()[:2]
    got = _infer_images(cpu_server, [p.read_bytes() for p in paths], protocol, class_count=3)
    expected = reference.run(np.stack([load_tensor(p) for p in paths]))
    labels = imagenet_labels()
    assert got.shape == (2, 3)
    for row, probs in zip(got, expected):
        entries = [entry.decode().split(":", 2) for entry in row]
        assert [int(i) for _, i, _ in entries] == list(np.argsort(-probs)[:3])
        for prob, index, label in entries:
            assert label == labels[int(index)] and abs(float(prob) - probs[int(index)]) < 1e-5


def test_uint8_model_takes_the_crop_and_equals_onnx_runtime(cpu_server, reference):
    uint8 = model_name(W18.name, "uint8")
    if not (cpu_server.repository / uint8).is_dir():
        pytest.skip(f"the export wrote no {uint8}.onnx beside the float model, so the repository has no {uint8}")
    paths = sample_images()[:3]
    crops = np.stack([load_crop(p) for p in paths])
    assert crops.dtype == np.uint8 and crops.shape == (3, 224, 224, 3)
    module, client = _client(cpu_server, "http")
    x = module.InferInput("x", list(crops.shape), "UINT8")
    x.set_data_from_numpy(crops)
    got = client.infer(uint8, [x]).as_numpy("probabilities")
    client.close()
    np.testing.assert_allclose(got, reference.run(np.stack([load_tensor(p) for p in paths])), rtol=0, atol=1e-5)


# -- a real server: bad images ---------------------------------------------------------------------

BAD_IMAGES = {
    "empty": (lambda png: b"", "the file is empty"),
    "not-an-image": (lambda png: b"plain text, not an image\n" * 20, "not a decodable image"),
    "truncated-jpeg": (lambda png: _jpeg()[: len(_jpeg()) // 2], "truncated JPEG (no end-of-image marker)"),
    "header-100000x100000": (
        lambda png: png(100_000, 100_000),
        "the header says 100000x100000 = 10,000,000,000 pixels, over the limit of 89,478,485",
    ),
    "1x5000": (lambda png: _png(5000, 1), "resizing it would make 256x1280000"),
}


def _error(server: LocalTritonServer, blobs: list[bytes], protocol: str = "http") -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        _infer_images(server, blobs, protocol)
    return caught.value


@pytest.mark.parametrize("bad", list(BAD_IMAGES))
def test_a_bad_image_is_refused_with_what_is_wrong_and_its_index(cpu_server, png_header_only, bad):
    make, expected = BAD_IMAGES[bad]
    err = _error(cpu_server, [make(png_header_only)])
    assert err.status() == "400", err
    assert f"image at index 0 of the request's 1: {expected}" in err.message(), err.message()
    if "pixels" in expected:  # the limit is the server's: a client flag cannot raise it
        assert "--max-pixels" not in err.message() and "hrnet_preprocess's max_pixels" in err.message()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_one_bad_image_among_good_ones_fails_its_request_naming_that_image(cpu_server, png_header_only, protocol):
    good = [p.read_bytes() for p in sample_images()[:3]]
    err = _error(cpu_server, [good[0], good[1], png_header_only(100_000, 100_000), good[2]], protocol)
    assert err.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), err
    assert "image at index 2 of the request's 4: the header says 100000x100000" in err.message()
    assert "index 0" not in err.message() and "index 3" not in err.message()


def test_every_bad_image_of_a_request_is_named_up_to_four_then_counted(cpu_server):
    good = sample_images()[0].read_bytes()
    err = _error(cpu_server, [good, b"", b"", good, b"", b"", b"", b""])
    named = [f"image at index {i} of the request's 8: the file is empty" for i in (1, 2, 4, 5)]
    assert all(n in err.message() for n in named) and err.message().endswith("and 2 more bad images")
    assert "index 0" not in err.message() and "index 6" not in err.message()


def _stub_rss_kib(server: LocalTritonServer, model: str) -> int:
    """Resident memory of the Python-backend stubs running ``model`` for ``server``."""
    total, found = 0, 0
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1].decode() == str(server.repository / model / "1" / "model.py"):
                status = (proc / "status").read_text()
                total += int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
                found += 1
        except (OSError, ValueError, StopIteration):
            continue  # a process that ended meanwhile
    assert found, f"no stub of {model} runs"
    return total


def test_bad_images_leave_the_server_answering_and_its_memory_flat(cpu_server, png_header_only, reference):
    blobs = [make(png_header_only) for make, _ in BAD_IMAGES.values()]
    for blob in blobs:  # once, so that whatever a first decode allocates is counted before
        _error(cpu_server, [blob])
    before = _stub_rss_kib(cpu_server, PREPROCESS_MODEL)
    for _ in range(8):
        for blob in blobs:
            _error(cpu_server, [blob, blob])
    after = _stub_rss_kib(cpu_server, PREPROCESS_MODEL)
    # a 100000x100000 image decoded would take 28 GiB; 64 MiB is generous for allocator noise
    assert after - before < 64 * 1024, f"hrnet_preprocess grew from {before} to {after} KiB"
    path = sample_images()[0]
    got = _infer_images(cpu_server, [path.read_bytes()])
    np.testing.assert_allclose(got, reference.run(load_tensor(path)[np.newaxis]), rtol=0, atol=1e-5)


def test_the_serving_environment_runs_this_projects_preprocessing(cpu_server):
    log = cpu_server.log_file.read_text(errors="replace")
    core = Path(__file__).parents[1] / "core" / "hrnet_core" / "__init__.py"
    assert f"hrnet_preprocess: hrnet_core {hrnet_core.__version__} from {core}" in log


# -- a real server: one dynamic batch with good and bad requests -----------------------------------

# Requests sent at once: their images add up to the preferred batch size of batching_server's
# hrnet_preprocess, so Triton runs them as one batch (the 10 s queue delay is only an upper bound).
BATCH = {"good": [0], "empty": [None], "mixed": [1, "truncated", 2], "good-pair": [3, 4]}
BATCH_IMAGES = sum(len(v) for v in BATCH.values())


@pytest.fixture(scope="module")
def batching_server(w18_offline, serve_env, free_ports, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    (root / "onnx").mkdir()
    (root / "onnx" / w18_offline.onnx.name).symlink_to(w18_offline.onnx)  # the float model alone
    one = RepositoryOptions.for_target(Target.CPU).override(instances=1)
    pre = RepositoryOptions(8, (BATCH_IMAGES,), 10_000_000, 32, 60_000_000, 1, InstanceKind.CPU, threads=2)
    write_repository(Target.CPU, [W18], root / "repo", one, onnx_dir=root / "onnx", preprocess_options=pre)
    with LocalTritonServer(root / "repo", serve_env=serve_env, ports=free_ports(), log_file=root / "triton.log") as srv:
        yield srv


def _preprocess_stats(server: LocalTritonServer) -> dict:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.ports.http}")
    stats = client.get_inference_statistics(PREPROCESS_MODEL, headers={ADMIN_HEADER: server.admin_key})
    client.close()
    (model,) = stats["model_stats"]
    return model


def test_bad_requests_fail_alone_in_a_dynamic_batch_the_others_get_their_answers(batching_server, reference):
    photos = [p.read_bytes() for p in sample_images()]
    blob = {None: b"", "truncated": _jpeg()[:-4000]}
    requests = {name: [blob[i] if i in blob else photos[i] for i in spec] for name, spec in BATCH.items()}
    results: dict[str, object] = {}
    start = threading.Barrier(len(requests))

    def send(name: str) -> None:
        start.wait()
        try:
            results[name] = _infer_images(batching_server, requests[name])
        except InferenceServerException as err:
            results[name] = err

    before = _preprocess_stats(batching_server)
    threads = [threading.Thread(target=send, args=(name,)) for name in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = _preprocess_stats(batching_server)
    # one execution of hrnet_preprocess ran every image of the four requests
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) == 1
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == BATCH_IMAGES
    assert "image at index 0 of the request's 1: the file is empty" in results["empty"].message()
    assert "image at index 1 of the request's 3: truncated JPEG" in results["mixed"].message()
    paths = sample_images()
    for name in ("good", "good-pair"):
        expected = reference.run(np.stack([load_tensor(paths[i]) for i in BATCH[name]]))
        np.testing.assert_allclose(results[name], expected, rtol=0, atol=1e-5)
    assert _infer_images(batching_server, photos[:BATCH_IMAGES]).shape == (BATCH_IMAGES, 1000)
