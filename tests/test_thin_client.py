"""Thin clients: the three inputs of a served variant (tensor, uint8, image), as the client, the
command line and bench choose them; the README's curl command; and what Triton's own example
client (``image_client.py``) requires of the served configs. Against the session's real server."""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import shutil
import struct
import subprocess
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from hrnet_client.served_model import Protocol, UnknownModelError, address, choose, new_client
from hrnet_client.triton import TritonClassifier
from hrnet_core.contract import ADMIN_KEY_ENV, INPUT_KINDS
from hrnet_core.errors import HrnetTritonError
from hrnet_core.preprocess import load_crop, preprocess_files
from hrnet_core.runtime import OnnxRuntimeRunner
from hrnet_core.samples import sample_images
from hrnet_triton.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
W18 = "HRNet_W18_C"


def _url(server, protocol: Protocol = Protocol.HTTP) -> str:
    return f"127.0.0.1:{server.ports.http if protocol is Protocol.HTTP else server.ports.grpc}"


def _jpeg() -> Path:
    return next(p for p in sample_images() if p.suffix == ".jpg")


@pytest.fixture(scope="module")
def expected(w18_offline) -> np.ndarray:
    """ONNX Runtime's probabilities for the sample photographs, preprocessed in-process."""
    return OnnxRuntimeRunner(w18_offline.onnx).run(preprocess_files(sample_images()))


# -- which model, which input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,kind,shared_memory,chosen",
    [
        (W18, None, False, "HRNet_W18_C_image"),  # the best the server offers
        (W18, None, True, "HRNet_W18_C_uint8"),  # encoded files do not go through shared memory
        (W18, "uint8", False, "HRNet_W18_C_uint8"),
        (W18, "tensor", False, W18),
        ("HRNet_W18_C_image", None, False, "HRNet_W18_C_image"),  # named directly: its config says image
        ("HRNet_W18_C_uint8", None, False, "HRNet_W18_C_uint8"),
        ("HRNet_W18_C_image", "tensor", False, W18),  # another kind of the same variant
        ("trivial", None, False, "trivial"),  # no input_kind parameter: the datatype says tensor
    ],
)
def test_the_input_is_the_best_the_server_offers_or_the_one_asked_for(cpu_server, model, kind, shared_memory, chosen):
    addr = address(cpu_server.http_url, Protocol.HTTP)
    client = new_client(addr, Protocol.HTTP)
    try:
        served = choose(client, addr, Protocol.HTTP, model, kind, shared_memory=shared_memory)
    finally:
        client.close()
    assert served.name == chosen
    assert served.input.kind == {W18: "tensor", "trivial": "tensor"}.get(chosen, chosen.rsplit("_", 1)[-1])


def test_an_input_the_server_does_not_offer_is_one_message(cpu_server):
    with pytest.raises(UnknownModelError, match="--input uint8 needs trivial_uint8; choose another --input"):
        TritonClassifier(cpu_server.http_url, "trivial", input="uint8")
    with pytest.raises(HrnetTritonError, match="not through shared memory; drop --shared-memory"):
        TritonClassifier(cpu_server.http_url, "HRNet_W18_C_image", shared_memory=True)


# -- every input, the same answers ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", list(Protocol), ids=lambda p: p.value)
def test_every_input_gives_the_answer_of_in_process_onnxruntime(cpu_server, expected, protocol):
    paths = sample_images()
    for kind in INPUT_KINDS:
        with TritonClassifier(_url(cpu_server, protocol), W18, protocol, input=kind, concurrency=2) as clf:
            preds = clf.classify_files(paths, k=5, batch_size=3)
            probs = clf.run(np.stack([clf.input.load(p, clf.cfg) for p in paths]))
        np.testing.assert_allclose(probs, expected, atol=1e-5, err_msg=kind)
        for pred, row in zip(preds, expected):
            assert [g.class_id for g in pred.top] == list(np.argsort(-row, kind="stable")[:5]), kind


def test_the_image_input_sends_the_files_bytes_unchanged_and_decodes_nothing(cpu_server, monkeypatch):
    def no_decoding(*_args, **_kwargs):
        raise AssertionError("the client decoded an image")

    for name in ("imdecode", "imread", "resize"):
        monkeypatch.setattr(cv2, name, no_decoding)
    sent: list[np.ndarray] = []
    infer = TritonClassifier._infer

    def spy(self, client, region, batch, k):
        sent.append(batch)
        return infer(self, client, region, batch, k)

    monkeypatch.setattr(TritonClassifier, "_infer", spy)
    paths = sample_images()
    with TritonClassifier(cpu_server.http_url, W18, input="image") as clf:
        preds = clf.classify_files(paths, k=1, batch_size=4)
    assert all(p.top and not p.error for p in preds)
    assert [e for batch in sent for e in batch[:, 0]] == [p.read_bytes() for p in paths]


def test_with_the_image_input_each_bad_file_gets_its_own_error(cpu_server, tmp_path):
    good = sample_images()[:3]
    bad, truncated, empty, fifo, big = (
        tmp_path / n for n in ("bad.jpg", "cut.jpg", "empty.png", "pipe.jpg", "big.png")
    )
    bad.write_bytes(b"not an image")
    truncated.write_bytes(_jpeg().read_bytes()[:3000])
    empty.write_bytes(b"")
    big.write_bytes(b"\0" * 3_000_001)
    os.mkfifo(fifo)  # refused unread: a reader that opened it would wait for a writer forever
    files = [good[0], bad, truncated, good[1], fifo, empty, big, good[2]]
    with TritonClassifier(_url(cpu_server, Protocol.GRPC), W18, Protocol.GRPC, input="image", concurrency=2) as clf:
        preds = clf.classify_files(files, k=1, batch_size=4, max_bytes=3_000_000)
    assert [p.image for p in preds] == [str(f) for f in files]
    errors = {Path(p.image).name: p.error for p in preds}
    assert all(p.top and not p.error for p in preds if Path(p.image) in good)
    assert "not a decodable image" in errors["bad.jpg"] and "truncated JPEG" in errors["cut.jpg"]
    assert "the file is empty" in errors["empty.png"]
    assert "not a regular file (a FIFO" in errors["pipe.jpg"] and "over the limit of 3,000,000" in errors["big.png"]


def test_with_the_image_input_files_are_read_as_they_are_needed(cpu_server):
    taken = 0

    def endless():
        nonlocal taken
        while True:
            taken += 1
            yield _jpeg()

    with TritonClassifier(cpu_server.http_url, W18, input="image", concurrency=2) as clf:
        predictions = clf.iter_files(endless(), k=1, batch_size=2)
        first = next(predictions)
        predictions.close()
    assert first.top and taken <= 2 * clf.concurrency * 2  # at most 2 x concurrency batches ahead


@pytest.mark.parametrize("protocol", list(Protocol), ids=lambda p: p.value)
def test_uint8_crops_go_through_shared_memory(cpu_server, expected, protocol, monkeypatch):
    monkeypatch.setenv(ADMIN_KEY_ENV, cpu_server.admin_key)  # registering regions is an admin API
    crops = np.stack([load_crop(p) for p in sample_images()])
    with TritonClassifier(_url(cpu_server, protocol), W18, protocol, shared_memory=True, concurrency=2) as clf:
        assert clf.model == "HRNet_W18_C_uint8"
        probs = clf.run(crops)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_server_top_k_through_the_ensemble_is_the_client_top_k(cpu_server):
    paths = sample_images()[:4]
    with TritonClassifier(cpu_server.http_url, W18, input="image") as clf:
        mine = clf.classify_files(paths, k=5)
    with TritonClassifier(cpu_server.http_url, W18, input="image", server_top_k=True) as clf:
        server = clf.classify_files(paths, k=5)
    for a, b in zip(mine, server):
        assert [(g.class_id, g.label) for g in a.top] == [(g.class_id, g.label) for g in b.top]
        np.testing.assert_allclose([g.probability for g in a.top], [g.probability for g in b.top], atol=1e-6)


def test_classify_and_preprocess_commands_take_the_input(cpu_server, tmp_path, capsys):
    answers = {}
    for kind in INPUT_KINDS:
        argv = ["classify", str(_jpeg()), "--url", cpu_server.http_url, "--model", W18, "--input", kind, "--json"]
        assert main(argv) == 0
        answers[kind] = [
            (g["class_id"], round(g["probability"], 5)) for g in json.loads(capsys.readouterr().out)[0]["top"]
        ]
    assert answers["image"] == answers["uint8"] == answers["tensor"]
    argv = ["preprocess", str(_jpeg()), "--out", str(tmp_path / "crop"), "--input", "uint8"]
    assert main([*argv, "--url", cpu_server.http_url, "--model", W18]) == 0
    assert "HRNet_W18_C_uint8's config" in capsys.readouterr().out
    crop = np.load(tmp_path / "crop.npy")
    assert crop.dtype == np.uint8 and crop.shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(crop[0], load_crop(_jpeg()))


def test_bench_sweeps_the_inputs_each_point_labelled(cpu_server, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--url", cpu_server.http_url, "--model", W18, "--inputs", "uint8,image", "--batch-sizes", "1"]
    argv += ["--tools", "locust"]  # perf_analyzer's side: tests/test_bench.py
    code = main([*argv, "--concurrency", "1", "--seconds", "3", "--out", str(out), "--admin-key", cpu_server.admin_key])
    assert code == 0
    with open(out / "bench.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["input"], r["model"]) for r in rows] == [("uint8", "HRNet_W18_C_uint8"), ("image", "HRNet_W18_C_image")]
    assert all(
        int(r["failures"]) == 0 and float(r["images_per_s"]) > 0 and float(r["server_compute_ms"]) > 0 for r in rows
    )
    assert "| image | 1 | 1 |" in (out / "bench.md").read_text()


# -- no Python needed: the README's curl command ----------------------------------------------------


def _readme_curl() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if "Inference-Header-Content-Length" in b)


def _labels(lines: list[str]) -> list[tuple[int, str, float]]:
    """``"probability:class:label"`` entries -> (class, label, probability)."""
    rows = [line.strip().strip('"').split(":", 2) for line in lines if line.strip()]
    return [(int(c), label, float(p)) for p, c, label in rows]


def _client_top3(server) -> list[tuple[int, str, float]]:
    with TritonClassifier(server.http_url, W18, input="tensor") as clf:
        (pred,) = clf.classify_files([_jpeg()], k=3)
    return [(g.class_id, g.label, g.probability) for g in pred.top]


def _same(got: list[tuple[int, str, float]], want: list[tuple[int, str, float]]) -> None:
    assert [(c, label) for c, label, _ in got] == [(c, label) for c, label, _ in want]
    np.testing.assert_allclose([p for *_, p in got], [p for *_, p in want], atol=1e-5)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (apt-get install -y curl)")
@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_the_readmes_curl_command_classifies_a_jpeg(cpu_server, tmp_path, shell):
    shutil.copy(_jpeg(), tmp_path / "photo.jpg")
    script = _readme_curl().replace("http://localhost:8000", cpu_server.http_url)
    run = subprocess.run([shell, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    _same(_labels(run.stdout.splitlines()), _client_top3(cpu_server))


def test_the_readmes_request_body_built_in_python_gets_the_labels(cpu_server):
    """The body the README's shell line builds, byte for byte: its JSON header, with the file's size
    where the shell computes it, then the BYTES element (4-byte little-endian length, the bytes)."""
    data = _jpeg().read_bytes()
    template = re.search(r"^HEADER='(.*)'$", _readme_curl(), re.M).group(1)
    header = template.replace("'$((N + 4))'", str(len(data) + 4))
    assert json.loads(header)["inputs"][0]["parameters"]["binary_data_size"] == len(data) + 4
    body = header.encode() + struct.pack("<I", len(data)) + data
    conn = http.client.HTTPConnection("127.0.0.1", cpu_server.ports.http, timeout=60)
    try:
        conn.request(
            "POST", "/v2/models/HRNet_W18_C_image/infer", body, {"Inference-Header-Content-Length": len(header)}
        )
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    _same(_labels(answer["outputs"][0]["data"]), _client_top3(cpu_server))


# -- Triton's own example client ------------------------------------------------------------------


@pytest.mark.parametrize("model,layout", [(W18, "FORMAT_NCHW"), ("HRNet_W18_C_uint8", "FORMAT_NHWC")])
def test_served_configs_declare_what_tritons_image_client_requires(cpu_server, model, layout):
    """The checks of ``parse_model`` in triton-inference-server/client's
    src/python/examples/image_client.py, on the served config and metadata (docs/input-costs.md)."""

    def get(path: str) -> dict:
        with urllib.request.urlopen(f"{cpu_server.http_url}/v2/models/{model}{path}", timeout=10) as r:
            return json.load(r)

    config, metadata = get("/config"), get("")
    assert len(metadata["inputs"]) == len(metadata["outputs"]) == len(config["input"]) == 1
    assert metadata["outputs"][0]["datatype"] == "FP32"
    assert config["max_batch_size"] > 0 and [d for d in metadata["outputs"][0]["shape"][1:] if d > 1] == [1000]
    shape = metadata["inputs"][0]["shape"]
    assert len(shape) == 4 and config["input"][0]["format"] == layout
    c, h, w = shape[1:] if layout == "FORMAT_NCHW" else (shape[3], shape[1], shape[2])
    assert (c, h, w) == (3, 224, 224)
