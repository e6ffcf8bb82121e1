"""The client against a real Triton server (the cpu target on the wheel's tritonserver)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hrnet_build.repository import RepositoryOptions, Target, write_repository
from hrnet_client.served_model import Protocol, ServerUnavailableError, UnknownModelError, address, admin_headers
from hrnet_client.triton import TritonClassifier
from hrnet_core import variants
from hrnet_core.preprocess import preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_triton.cli import main
from hrnet_triton.server import LocalTritonServer


@pytest.mark.parametrize("protocol", list(Protocol), ids=lambda p: p.value)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_served_probabilities_equal_onnxruntime_in_process(cpu_server, w18_offline, protocol, batch_size):
    port = cpu_server.ports.http if protocol is Protocol.HTTP else cpu_server.ports.grpc
    clf = TritonClassifier(f"127.0.0.1:{port}", "HRNet_W18_C", protocol, input="tensor")
    assert clf.max_batch == 8 and clf.cfg.resize_short == 256  # read from the server's config
    paths = sample_images()
    preds = clf.classify_files(paths, k=5, batch_size=batch_size)
    expected = OnnxRuntimeRunner(w18_offline.onnx).run(preprocess_files(paths))
    got = clf.run(preprocess_files(paths))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for pred, row in zip(preds, expected):
        assert [g.class_id for g in pred.top] == list(np.argsort(-row, kind="stable")[:5])


def test_cli_classify_over_http_and_grpc_gives_the_same_answer(cpu_server, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    results = {}
    for protocol, port in (("http", cpu_server.ports.http), ("grpc", cpu_server.ports.grpc)):
        code = main(
            [
                "classify",
                str(bad),
                "--samples",
                "--url",
                f"127.0.0.1:{port}",
                "--model",
                "HRNet_W18_C",
                "--protocol",
                protocol,
                "--json",
                "--top-k",
                "3",
            ]
        )
        assert code == 2  # the bad file; the others were classified
        results[protocol] = json.loads(capsys.readouterr().out)
    assert results["http"][0]["error"] and "bad.png" in results["http"][0]["error"]
    strip = lambda rows: [[(g["class_id"], round(g["probability"], 5)) for g in r["top"]] for r in rows]  # noqa: E731
    assert strip(results["http"]) == strip(results["grpc"])
    assert len(results["http"]) == 1 + len(sample_images())


def test_unknown_model_lists_what_the_server_has(cpu_server, monkeypatch):
    monkeypatch.setenv("HRNET_TRITON_ADMIN_KEY", cpu_server.admin_key)  # the model list is an admin API
    with pytest.raises(UnknownModelError, match="no model 'HRNet_W99_C'.*it serves: HRNet_W18_C"):
        TritonClassifier(cpu_server.http_url, "HRNet_W99_C")


def test_server_that_is_down_is_reported_after_retries(free_ports):
    port = free_ports().http  # nothing listens there
    with pytest.raises(
        ServerUnavailableError, match=f"no Triton server answers at 127.0.0.1:{port} over http after 2 tries"
    ):
        TritonClassifier(f"127.0.0.1:{port}", "HRNet_W18_C", retries=1)


def test_address_accepts_urls_and_fills_default_ports():
    assert address("http://example:9000", Protocol.HTTP) == "example:9000"
    assert address("localhost", Protocol.GRPC) == "localhost:8001"
    assert address("localhost", Protocol.HTTP) == "localhost:8000"
    # Locust's --host is the HTTP address; gRPC goes to --grpc-port unless the URL says grpc://
    assert address("http://example:8000", Protocol.GRPC, grpc_port=9001) == "example:9001"
    assert address("grpc://example:7001", Protocol.GRPC, grpc_port=9001) == "example:7001"


def test_demo_classifies_through_all_three_inputs_over_both_protocols(
    w18_offline, tmp_path, capsys, serve_env, free_ports
):
    import shutil

    out = tmp_path / "artifacts"
    out.mkdir()
    for name in ("HRNet_W18_C.onnx", "HRNet_W18_C_uint8.onnx"):  # the demo exports only if they are missing
        shutil.copy(w18_offline.onnx.with_name(name), out / name)
    ports = free_ports()
    args = ["demo", "--out", str(out), "--http-port", str(ports.http), "--grpc-port", str(ports.grpc)]
    code = main([*args, "--metrics-port", str(ports.metrics)])
    printed = capsys.readouterr().out
    assert code == 0
    blocks = printed.split("\n== over ")[1:]
    assert [b.split(" ==")[0] for b in blocks] == ["HTTP, image input", "GRPC, uint8 input", "HTTP, tensor input"]

    def classes(block: str) -> list[str]:  # class id and label of each line, without the probability
        return [
            line.split(None, 1)[1] for line in block.splitlines()[2:] if line.startswith("  ") and "error" not in line
        ]

    assert classes(blocks[0]) and classes(blocks[0]) == classes(blocks[1]) == classes(blocks[2])


@pytest.mark.parametrize("protocol", list(Protocol), ids=lambda p: p.value)
def test_concurrent_requests_through_shared_memory_equal_onnxruntime(cpu_server, w18_offline, protocol):
    port = cpu_server.ports.http if protocol is Protocol.HTTP else cpu_server.ports.grpc
    x = preprocess_files(sample_images())
    batch = np.concatenate([x, x[::-1], x])  # 21 images: three requests of 8, 8 and 5
    expected = OnnxRuntimeRunner(w18_offline.onnx).run(batch)
    key = cpu_server.admin_key  # the server's admin APIs, shared memory among them, need its key
    with TritonClassifier(
        f"127.0.0.1:{port}", "HRNet_W18_C", protocol, input="tensor", concurrency=3, shared_memory=True, admin_key=key
    ) as clf:
        regions = _shared_memory_regions(cpu_server)
        assert len([r for r in regions if r.startswith("hrnet-")]) == 6  # an input and an output per lane
        np.testing.assert_allclose(clf.run(batch), expected, atol=1e-5)
    assert _shared_memory_regions(cpu_server) == [], "close() leaves regions registered"
    assert not [f for f in __import__("os").listdir("/dev/shm") if f.startswith("hrnet-")]


def _shared_memory_regions(cpu_server) -> list[str]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{cpu_server.ports.http}")
    status = client.get_system_shared_memory_status(headers=admin_headers(Protocol.HTTP, cpu_server.admin_key))
    return sorted(r["name"] for r in status)


@pytest.mark.parametrize("protocol", list(Protocol), ids=lambda p: p.value)
def test_server_top_k_is_the_client_top_k(cpu_server, protocol):
    port = cpu_server.ports.http if protocol is Protocol.HTTP else cpu_server.ports.grpc
    by_client = TritonClassifier(f"127.0.0.1:{port}", "HRNet_W18_C", protocol).classify_files(sample_images(), k=5)
    with TritonClassifier(f"127.0.0.1:{port}", "HRNet_W18_C", protocol, server_top_k=True, concurrency=2) as clf:
        by_server = clf.classify_files(sample_images(), k=5, batch_size=3)
    for a, b in zip(by_client, by_server):
        assert [(g.class_id, g.label) for g in a.top] == [(g.class_id, g.label) for g in b.top]
        # Triton prints the probability with six decimals
        np.testing.assert_allclose([g.probability for g in a.top], [g.probability for g in b.top], atol=1e-6)


def test_wrong_shapes_and_dtypes_are_refused_before_sending(cpu_server):
    from hrnet_client.triton import InferenceError

    clf = TritonClassifier(cpu_server.http_url, "HRNet_W18_C", input="tensor")
    with pytest.raises(InferenceError, match=r"shape \(N>=1, 3, 224, 224\), got float32 \(2, 3, 256, 256\)"):
        clf.run(np.zeros((2, 3, 256, 256), np.float32))
    with pytest.raises(InferenceError, match="takes float32 tensors, got float64"):
        clf.run(np.zeros((1, 3, 224, 224)))


def test_every_bad_file_is_named_the_rest_are_classified_and_the_server_still_answers(
    cpu_server, tmp_path, capsys, png_header_only
):
    rocket = next(p for p in sample_images() if p.name == "rocket.jpg").read_bytes()
    bad = {
        "empty.jpg": (b"", "the file is empty"),
        "cut.jpg": (rocket[: len(rocket) // 2], "truncated JPEG"),
        "notes.png": (b"these are not pixels", "not a decodable image"),
        "bomb.png": (png_header_only(60_000, 60_000), "over the limit of 89,478,485"),
    }
    for name, (content, _) in bad.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.jpg").mkdir()
    names = [*bad, "folder.jpg", "absent.jpg"]
    good = sample_images()[:3]
    args = [*(str(tmp_path / n) for n in names), *map(str, good)]
    code = main(["classify", *args, "--url", cpu_server.http_url, "--model", "HRNet_W18_C", "--json", "--top-k", "2"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 2
    for row, name in zip(rows, names):
        assert row["top"] == [] and row["error"].startswith(str(tmp_path / name)), row
    for name, (_, problem) in bad.items():
        assert problem in rows[names.index(name)]["error"]
    assert "cannot read the file" in rows[names.index("absent.jpg")]["error"]
    assert [len(r["top"]) for r in rows[len(names) :]] == [2, 2, 2] and not any(r["error"] for r in rows[len(names) :])
    assert main(["classify", str(good[0]), "--url", cpu_server.http_url, "--model", "HRNet_W18_C"]) == 0


def test_overload_is_reported_as_the_queue_policy_rejection(w18_offline, tmp_path, capsys, serve_env, free_ports):
    from hrnet_client.triton import ServerOverloadedError

    repo = tmp_path / "repo"
    options = RepositoryOptions.for_target(Target.CPU).override(max_queue_size=1)
    write_repository(Target.CPU, [variants.get("HRNet_W18_C")], repo, options, onnx_dir=w18_offline.onnx.parent)
    with LocalTritonServer(repo, serve_env=serve_env, ports=free_ports(), log_file=tmp_path / "triton.log") as srv:
        x = preprocess_files(sample_images()[:1])
        with TritonClassifier(srv.http_url, "HRNet_W18_C", input="tensor", concurrency=12, retry_s=0) as clf:
            with pytest.raises(
                ServerOverloadedError,
                match="overloaded and rejected a batch of 8.*Exceeds maximum queue size.*not retried",
            ):
                clf.run(np.repeat(x, 8 * 12, axis=0))
        images = [str(p) for p in sample_images()] * 12  # 84 images, 11 requests at once
        code = main(
            ["classify", *images, "--url", srv.http_url, "--model", "HRNet_W18_C", "--concurrency", "11", "--json"]
            + ["--retry-seconds", "0"]
        )
        rows = json.loads(capsys.readouterr().out)
        assert code == 2
        refused = [r for r in rows if r["error"]]
        assert refused and all("is overloaded" in r["error"] for r in refused)
        assert len(refused) < len(rows), "the requests the queue admitted were answered"
        assert TritonClassifier(srv.http_url, "HRNet_W18_C", input="tensor").run(x).shape == (1, 1000)  # recovered


@pytest.mark.parametrize("from_server", [False, True], ids=["defaults", "server-config"])
def test_preprocess_command_writes_paddleclas_tensor(cpu_server, tmp_path, from_server, capsys):
    from paddleclas_reference import paddleclas_deploy_tensor

    for path in sample_images():
        out = tmp_path / f"{path.stem}.npy"
        extra = ["--url", cpu_server.http_url, "--model", "HRNet_W18_C"] if from_server else []
        assert main(["preprocess", str(path), "--out", str(out), *extra]) == 0
        x = np.load(out)
        assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
        np.testing.assert_allclose(x[0], paddleclas_deploy_tensor(path), atol=1e-5, rtol=0, err_msg=path.name)
    assert ("HRNet_W18_C's config on" in capsys.readouterr().out) == from_server


def test_preprocess_command_on_a_bad_image_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    rocket = next(p for p in sample_images() if p.name == "rocket.jpg").read_bytes()
    bad.write_bytes(rocket[: len(rocket) // 3])
    assert main(["preprocess", str(bad), "--out", str(tmp_path / "x.npy")]) == 1
    assert "bad.jpg: truncated JPEG" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]
