"""The Triton model repository: configs parsed with Triton's protobuf, and a real server."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from hrnet_build import repository
from hrnet_build.repository import RepositoryOptions, Target, options_from_config, parse_config, write_repository
from hrnet_core import variants
from hrnet_core.contract import DEFAULT_PREPROCESS, INPUT_KINDS, PREPROCESS_MODEL, PreprocessConfig, model_name
from hrnet_core.errors import HrnetTritonError
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_triton.cli import main
from hrnet_triton.server import LocalTritonServer, ServerError

REPO_ROOT = Path(__file__).resolve().parents[1]
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: pb.TYPE_FP32}


def _onnx_io(path: Path):
    m = onnx.load(str(path), load_external_data=False)
    (i,), (o,) = m.graph.input, m.graph.output
    dims = lambda vi: [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    return (i.name, ONNX_TO_TRITON[i.type.tensor_type.elem_type], dims(i)), (
        o.name,
        ONNX_TO_TRITON[o.type.tensor_type.elem_type],
        dims(o),
    )


@pytest.mark.parametrize("target", list(Target), ids=lambda t: t.value)
def test_every_config_parses_with_triton_protobuf_and_agrees_with_the_onnx_model(target, tmp_path, w18_offline):
    (in_name, in_type, in_dims), (out_name, out_type, out_dims) = _onnx_io(w18_offline.onnx)
    write_repository(target, variants.VARIANTS, tmp_path)
    for v in variants.VARIANTS:
        cfg = text_format.Parse((tmp_path / v.name / "config.pbtxt").read_text(), pb.ModelConfig())
        assert cfg.name == v.name
        (inp,), (out,) = cfg.input, cfg.output
        # Triton's dims leave out the batch dimension that max_batch_size stands for.
        assert (inp.name, inp.data_type, [-1, *inp.dims]) == (in_name, in_type, in_dims)
        assert (out.name, out.data_type, [-1, *out.dims]) == (out_name, out_type, out_dims)
        assert out.label_filename == "labels.txt"
        assert options_from_config(cfg) == RepositoryOptions.for_target(target)
        policy = cfg.dynamic_batching.default_queue_policy
        assert policy.timeout_action == pb.ModelQueuePolicy.REJECT and policy.max_queue_size > 0
        assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
        assert PreprocessConfig.from_triton_config(cfg) == DEFAULT_PREPROCESS
        labels = (tmp_path / v.name / "labels.txt").read_text().splitlines()
        assert len(labels) == 1000 and labels[0] == "tench, Tinca tinca"


def test_gpu_config_is_a_tensorrt_plan_on_gpu_with_cuda_graphs_and_warmup(tmp_path):
    cfg = repository.model_config(variants.get("HRNet_W64_C"), Target.GPU)
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert cfg.optimization.cuda.graphs
    assert [s.batch_size for s in cfg.optimization.cuda.graph_spec] == [1, 8, 16, 32]
    assert sorted(w.batch_size for w in cfg.model_warmup) == [1, cfg.max_batch_size]
    assert cfg.model_warmup[0].inputs["x"].zero_data


def _options(target: Target, **overrides) -> RepositoryOptions:
    return RepositoryOptions.for_target(target).override(**overrides)


def test_onnx_config_caps_onnxruntime_threads_only_when_asked():
    w18 = variants.get("HRNet_W18_C")
    onnxruntime = _options(Target.ONNX, runtime="onnxruntime")
    assert "intra_op_thread_count" not in repository.model_config(w18, Target.ONNX, onnxruntime).parameters
    cfg = repository.model_config(w18, Target.ONNX, _options(Target.ONNX, threads=4, runtime="onnxruntime"))
    assert cfg.backend == "onnxruntime" and cfg.parameters["intra_op_thread_count"].string_value == "4"
    with pytest.raises(HrnetTritonError, match="threads must be at least 1, got 0"):
        _options(Target.ONNX, threads=0)


def test_cpu_config_runs_python_backend_with_the_threads_asked_for():
    cfg = repository.model_config(variants.get("HRNet_W18_C"), Target.CPU, _options(Target.CPU, threads=3))
    assert cfg.backend == "python" and cfg.parameters["runtime_threads"].string_value == "3"


def test_cpu_default_is_two_single_threaded_instances_taking_whatever_waits():
    cfg = repository.model_config(variants.get("HRNet_W18_C"), Target.CPU)
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, pb.ModelInstanceGroup.KIND_CPU)]
    assert cfg.parameters["runtime_threads"].string_value == "1"
    assert list(cfg.dynamic_batching.preferred_batch_size) == []
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0


def test_instances_and_queue_size_can_be_overridden_and_are_checked():
    options = _options(Target.ONNX, instances=3, max_queue_size=1)
    cfg = repository.model_config(variants.get("HRNet_W18_C"), Target.ONNX, options)
    assert cfg.instance_group[0].count == 3 and cfg.dynamic_batching.default_queue_policy.max_queue_size == 1
    with pytest.raises(HrnetTritonError, match="instances must be at least 1, got 0"):
        _options(Target.CPU, instances=0)
    with pytest.raises(HrnetTritonError, match="max_queue_size must be at least 0, got -1"):
        _options(Target.CPU, max_queue_size=-1)


def test_batching_rejects_preferred_sizes_above_the_maximum():
    with pytest.raises(HrnetTritonError, match="must lie in 1..max_batch_size=8"):
        RepositoryOptions(8, (4, 16), 100, 8, 1000, 1, "cpu")


@pytest.mark.parametrize("target", list(Target), ids=lambda t: t.value)
def test_options_survive_the_round_trip_through_config_pbtxt(target):
    options = _options(target, max_batch=4, instances=3, max_queue_size=7, threads=2, instance_kind="gpu")
    text = repository.config_text(repository.model_config(variants.get("HRNet_W30_C"), target, options))
    parsed = options_from_config(parse_config(text))
    expected = (
        options if target is not Target.GPU else dataclasses.replace(options, threads=None)
    )  # plans take no threads
    assert parsed == expected
    assert parsed.max_batch_size == 4 and all(s <= 4 for s in parsed.preferred_batch_sizes)


def test_a_smaller_max_batch_keeps_only_the_preferred_and_graph_sizes_that_fit():
    o = RepositoryOptions.for_target(Target.GPU).with_max_batch(12)
    assert o.preferred_batch_sizes == (8,) and o.cuda_graph_batch_sizes == (1, 8)
    assert RepositoryOptions.for_target(Target.ONNX).with_max_batch(2).preferred_batch_sizes == (2,)


def test_cpu_repository_without_the_onnx_file_is_an_error(tmp_path):
    with pytest.raises(HrnetTritonError, match="no such ONNX model; create it with `hrnet-triton export HRNet_W18_C`"):
        write_repository(Target.CPU, [variants.get("HRNet_W18_C")], tmp_path / "r", onnx_dir=tmp_path)


def test_committed_model_repository_is_what_repo_writes_for_the_gpu_target(tmp_path):
    assert main(["-q", "repo", "--target", "gpu", "--out", str(tmp_path)]) == 0
    committed = REPO_ROOT / "model_repository"
    # each variant three ways (docs/inputs.md), and the preprocessing model the ensembles share
    expected = sorted([*(model_name(v, k) for v in variants.names() for k in INPUT_KINDS), PREPROCESS_MODEL])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == expected
    assert sorted(p.name for p in committed.iterdir() if p.is_dir()) == expected
    for name in expected:
        for f in ("config.pbtxt", "labels.txt"):
            assert (committed / name / f).is_file() == (tmp_path / name / f).is_file()
            if (tmp_path / name / f).is_file():
                assert (committed / name / f).read_text() == (tmp_path / name / f).read_text(), (
                    f"{name}/{f} is stale: rerun `hrnet-triton repo --target gpu --out model_repository`"
                )
        parse_config((committed / name / "config.pbtxt").read_text())


# --- a real Triton server ----------------------------------------------------------------------


def test_cpu_target_loads_in_the_pip_installed_tritonserver_and_answers(tmp_path, w18_offline, serve_env, free_ports):
    import tritonclient.http as httpclient

    from hrnet_core.preprocess import preprocess_files
    from hrnet_core.samples import sample_images

    write_repository(Target.CPU, [variants.get("HRNet_W18_C")], tmp_path / "repo", onnx_dir=w18_offline.onnx.parent)
    with LocalTritonServer(
        tmp_path / "repo", serve_env=serve_env, ports=free_ports(), log_file=tmp_path / "triton.log"
    ) as server:
        client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        assert client.is_model_ready("HRNet_W18_C")
        cfg = client.get_model_config("HRNet_W18_C")
        assert cfg["max_batch_size"] == RepositoryOptions.for_target(Target.CPU).max_batch_size
        assert cfg["parameters"]["resize_short"]["string_value"] == "256"
        batch = preprocess_files(sample_images()[:3])
        inp = httpclient.InferInput("x", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        got = client.infer("HRNet_W18_C", [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(got, OnnxRuntimeRunner(w18_offline.onnx).run(batch), atol=1e-5)


def test_cpu_target_refuses_to_serve_under_numpy_2(tmp_path, w18_offline, serve_env, free_ports):
    """The stub of this Triton release returns empty outputs under numpy 2; model.py says so."""
    import sys

    numpy2_env = Path(sys.prefix)  # the test environment itself has numpy 2
    assert int(np.__version__.split(".")[0]) >= 2
    write_repository(Target.CPU, [variants.get("HRNet_W18_C")], tmp_path / "repo", onnx_dir=w18_offline.onnx.parent)
    log = tmp_path / "triton.log"
    with pytest.raises(ServerError, match="exited with code"):
        LocalTritonServer(tmp_path / "repo", serve_env=numpy2_env, ports=free_ports(), log_file=log).start(timeout_s=60)
    assert "returns empty outputs with numpy 2" in log.read_text(errors="replace")
