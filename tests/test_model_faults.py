"""Faulty requests against the cpu target's Python-backend model, on a real Triton server whose
dynamic batcher merges a bad request with good ones into one execution."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from hrnet_build.repository import RepositoryOptions, Target, write_repository
from hrnet_core import variants
from hrnet_core.contract import ADMIN_HEADER
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_triton.server import LocalTritonServer

MODEL = "HRNet_W18_C"


@pytest.fixture(scope="module")
def batching_server(w18_offline, serve_env, free_ports, tmp_path_factory):
    """One instance and a 200 ms queue delay: concurrent requests wait for each other and run as one batch."""
    root = tmp_path_factory.mktemp("faults")
    options = RepositoryOptions.for_target(Target.CPU).override(instances=1)
    options = dataclasses.replace(options, max_queue_delay_us=200_000)
    write_repository(Target.CPU, [variants.get(MODEL)], root / "repo", options, onnx_dir=w18_offline.onnx.parent)
    with LocalTritonServer(root / "repo", serve_env=serve_env, ports=free_ports(), log_file=root / "triton.log") as srv:
        yield srv


def _infer_together(url: str, batches: list[np.ndarray]) -> list[np.ndarray | Exception]:
    """Send every batch as its own request, all at once (one HTTP client per thread)."""
    import tritonclient.http as httpclient

    host = url.removeprefix("http://")
    clients = [httpclient.InferenceServerClient(host) for _ in batches]
    start = threading.Barrier(len(batches))
    results: list[np.ndarray | Exception] = [RuntimeError("no answer")] * len(batches)

    def send(i: int) -> None:
        inp = httpclient.InferInput("x", list(batches[i].shape), "FP32")
        inp.set_data_from_numpy(batches[i])
        start.wait()
        try:
            results[i] = clients[i].infer(MODEL, [inp]).as_numpy("probabilities")
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results[i] = err

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for c in clients:
        c.close()
    return results


def _executions(server: LocalTritonServer) -> int:
    """How many times Triton has run the model (warmup included); statistics need the admin key."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    headers = {ADMIN_HEADER: server.admin_key} if server.admin_key else None
    stats = client.get_inference_statistics(MODEL, headers=headers)["model_stats"][0]
    client.close()
    return int(stats["execution_count"])


def test_python_model_refuses_only_the_non_finite_request_when_batched_with_good_ones(batching_server, w18_offline):
    from tritonclient.utils import InferenceServerException

    rng = np.random.default_rng(0)
    good = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in (1, 2, 1)]
    bad = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    bad[0, 1, 100, 100] = np.nan
    bad[1, 0, 0, 0] = np.inf
    before = _executions(batching_server)
    results = _infer_together(batching_server.http_url, [good[0], bad, good[1], good[2]])
    executions = _executions(batching_server) - before

    refused = results[1]
    assert isinstance(refused, InferenceServerException), refused
    assert refused.status() == "400"
    assert "input x holds 2 non-finite values (NaN/Inf); send finite, preprocessed pixels" in refused.message()
    reference = OnnxRuntimeRunner(w18_offline.onnx)
    for sent, got in zip(good, [results[0], results[2], results[3]]):
        assert isinstance(got, np.ndarray), got
        # served by OpenVINO FP32: within the float32 floor of its parity gate (docs/cpu-speed.md)
        np.testing.assert_allclose(got, reference.run(sent), rtol=0, atol=3e-5)
    assert executions < 4, f"{executions} executions for 4 requests: the bad one was not batched with good ones"


def test_cpu_repository_warmup_sends_finite_data_when_written(tmp_path, w18_offline):
    """Triton's random_data fills FP32 with random bytes (about 600 NaN/Inf per image): the
    model refuses them, the warmup fails and the model never loads. Warmup must send zeros."""
    from hrnet_build.repository import model_config

    cfg = model_config(variants.get(MODEL), Target.CPU, RepositoryOptions.for_target(Target.CPU))
    inputs = [inp for warm in cfg.model_warmup for inp in warm.inputs.values()]
    assert inputs and all(inp.zero_data and not inp.random_data for inp in inputs)
