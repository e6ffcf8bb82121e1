from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import paddle
import pytest

from hrnet_build import download, weights
from hrnet_build.network import build
from hrnet_build.weights import WeightsKind, WeightsSpec
from hrnet_core import variants
from hrnet_core.errors import DownloadError, WeightsError

from httpfiles import FileServer, closed_port_url

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


# --- --weights parsing -------------------------------------------------------------------


def test_weights_spec_parses_keywords_and_paths(tmp_path):
    pd = tmp_path / "w.pdparams"
    pd.write_bytes(b"x")
    tar = tmp_path / "HRNet_W18_C_infer.tar"
    tar.write_bytes(b"x")
    assert WeightsSpec.parse("auto").kind is WeightsKind.AUTO
    assert WeightsSpec.parse("offline").kind is WeightsKind.OFFLINE
    assert WeightsSpec.parse(str(pd)) == WeightsSpec(WeightsKind.PDPARAMS, pd)
    assert WeightsSpec.parse(str(tar)) == WeightsSpec(WeightsKind.INFERENCE_MODEL, tar)
    assert WeightsSpec.parse(str(tmp_path)).kind is WeightsKind.INFERENCE_MODEL


def test_weights_spec_rejects_a_missing_path_with_the_accepted_forms(tmp_path):
    with pytest.raises(WeightsError, match="no such file.*'auto', 'offline', a .pdparams"):
        WeightsSpec.parse(str(tmp_path / "nope.pdparams"))


def test_weights_spec_rejects_a_file_of_another_kind(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    with pytest.raises(WeightsError, match="expected a .pdparams file"):
        WeightsSpec.parse(str(f))


# --- strict .pdparams loading --------------------------------------------------------------


def test_load_pdparams_accepts_weights_saved_from_paddleclas_module(tmp_path):
    from paddleclas_reference import build_reference

    paddle.seed(1)
    ref = build_reference(18, False)
    path = tmp_path / "HRNet_W18_C_pretrained.pdparams"
    paddle.save(ref.state_dict(), str(path))
    ours = build(18, False)
    weights.load_pdparams(ours, path)
    ref.eval(), ours.eval()
    x = paddle.rand([1, 3, 64, 64])
    with paddle.no_grad():
        np.testing.assert_array_equal(ours(x).numpy(), ref(x).numpy())


def test_load_pdparams_names_missing_unexpected_and_misshaped_keys(tmp_path):
    state = build(18, False).state_dict()
    state.pop("fc.bias")
    state["head.extra.weight"] = paddle.zeros([3])
    state["conv_last.conv.weight"] = paddle.zeros([2048, 1000, 1, 1])
    path = tmp_path / "bad.pdparams"
    paddle.save(state, str(path))
    with pytest.raises(WeightsError) as err:
        weights.load_pdparams(build(18, False), path)
    msg = str(err.value)
    assert "1 missing: fc.bias" in msg
    assert "1 unexpected: head.extra.weight" in msg
    assert "1 mis-shaped: conv_last.conv.weight (2048, 1000, 1, 1) (network wants (2048, 1024, 1, 1))" in msg


def test_load_pdparams_of_another_width_reports_misshaped_keys(tmp_path):
    path = tmp_path / "w30.pdparams"
    paddle.save(build(30, False).state_dict(), str(path))
    with pytest.raises(WeightsError, match=r"mis-shaped: .*\(30, 256, 3, 3\) \(network wants \(18, 256, 3, 3\)\)"):
        weights.load_pdparams(build(18, False), path)


def test_load_pdparams_rejects_a_file_that_is_not_weights(tmp_path):
    path = tmp_path / "junk.pdparams"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(WeightsError, match="not a readable .pdparams file"):
        weights.load_pdparams(build(18, False), path)


# --- downloads -----------------------------------------------------------------------------


def test_fetch_downloads_once_and_records_the_hash(tmp_path):
    with FileServer({"/w.pdparams": PAYLOAD}) as srv:
        dest = download.fetch(f"{srv.url}/w.pdparams", tmp_path / "w.pdparams", progress=False)
        again = download.fetch(f"{srv.url}/w.pdparams", tmp_path / "w.pdparams", progress=False)
    assert dest == again and dest.read_bytes() == PAYLOAD
    assert (tmp_path / "w.pdparams.sha256").read_text().strip() == hashlib.sha256(PAYLOAD).hexdigest()
    assert len(srv.requests) == 1  # the second call used the cache


def test_fetch_resumes_an_interrupted_download_with_a_range_request(tmp_path):
    with FileServer({"/w.pdparams": PAYLOAD}) as srv:
        srv.cut_after = 300_000
        with pytest.raises(DownloadError, match="run the command again to resume|resumed on the next try"):
            download.fetch(f"{srv.url}/w.pdparams", tmp_path / "w.pdparams", progress=False)
        assert not (tmp_path / "w.pdparams").exists()
        assert (tmp_path / "w.pdparams.part").stat().st_size == 300_000
        dest = download.fetch(f"{srv.url}/w.pdparams", tmp_path / "w.pdparams", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert srv.requests[-1] == ("/w.pdparams", "bytes=300000-")
    assert not (tmp_path / "w.pdparams.part").exists()


def test_fetch_refetches_a_cached_file_damaged_on_disk(tmp_path):
    with FileServer({"/w.pdparams": PAYLOAD}) as srv:
        dest = download.fetch(f"{srv.url}/w.pdparams", tmp_path / "w.pdparams", progress=False)
        dest.write_bytes(b"bit rot" + PAYLOAD[7:])
        download.fetch(f"{srv.url}/w.pdparams", tmp_path / "w.pdparams", progress=False)
    assert dest.read_bytes() == PAYLOAD and len(srv.requests) == 2


def test_fetch_discards_a_download_with_the_wrong_pinned_hash(tmp_path):
    with FileServer({"/w.pdparams": PAYLOAD}) as srv, pytest.raises(DownloadError, match="expected 0000"):
        download.fetch(f"{srv.url}/w.pdparams", tmp_path / "w.pdparams", sha256="0000" * 16, progress=False)
    assert not any(tmp_path.iterdir())


def test_fetch_reports_http_errors(tmp_path):
    with FileServer({}) as srv, pytest.raises(DownloadError, match="HTTP 404"):
        download.fetch(f"{srv.url}/missing.pdparams", tmp_path / "m.pdparams", progress=False)


def test_auto_weights_without_network_say_how_to_supply_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", closed_port_url())
    with pytest.raises(DownloadError, match="pass its path with --weights, or use --weights offline"):
        weights.resolve(variants.get("HRNet_W18_C"), WeightsSpec.parse("auto"), cache=tmp_path)


def test_auto_weights_download_from_the_mirror_path_of_paddleclas(tmp_path, monkeypatch):
    with FileServer({"/legendary_models/HRNet_W30_C_pretrained.pdparams": PAYLOAD}) as srv:
        monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", srv.url + "/")
        got = weights.resolve(variants.get("HRNet_W30_C"), WeightsSpec.parse("auto"), cache=tmp_path, progress=False)
    assert got.kind is WeightsKind.PDPARAMS and got.path.read_bytes() == PAYLOAD
    assert got.source == f"{srv.url}/legendary_models/HRNet_W30_C_pretrained.pdparams"
    assert got.sha256 == hashlib.sha256(PAYLOAD).hexdigest()


# --- inference-model tars --------------------------------------------------------------------


def _fake_infer_tar(tmp_path: Path, members: dict[str, bytes]) -> Path:
    tar_path = tmp_path / "HRNet_W18_C_infer.tar"
    src = tmp_path / "src"
    for name, data in members.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src / "HRNet_W18_C_infer", arcname="HRNet_W18_C_infer")
    return tar_path


def test_inference_tar_is_unpacked_once_and_its_model_found(tmp_path):
    tar_path = _fake_infer_tar(
        tmp_path, {"HRNet_W18_C_infer/inference.pdmodel": b"graph", "HRNet_W18_C_infer/inference.pdiparams": b"p"}
    )
    got = weights.resolve(variants.get("HRNet_W18_C"), WeightsSpec.parse(str(tar_path)), cache=tmp_path / "c")
    assert got.kind is WeightsKind.INFERENCE_MODEL
    model = weights.find_inference_model(got.path)
    assert model.graph.read_bytes() == b"graph" and model.params.read_bytes() == b"p"
    again = weights.resolve(variants.get("HRNet_W18_C"), WeightsSpec.parse(str(tar_path)), cache=tmp_path / "c")
    assert again.path == got.path


def test_inference_dir_without_model_files_is_rejected(tmp_path):
    tar_path = _fake_infer_tar(tmp_path, {"HRNet_W18_C_infer/inference.pdiparams": b"p"})
    with pytest.raises(WeightsError, match="not a Paddle inference model"):
        weights.resolve(variants.get("HRNet_W18_C"), WeightsSpec.parse(str(tar_path)), cache=tmp_path / "c")


def test_corrupt_inference_tar_is_rejected_and_leaves_no_partial_directory(tmp_path):
    tar_path = tmp_path / "HRNet_W18_C_infer.tar"
    tar_path.write_bytes(b"\0" * 100 + b"not a tar" * 50)
    with pytest.raises(WeightsError, match="cannot unpack"):
        weights.resolve(variants.get("HRNet_W18_C"), WeightsSpec.parse(str(tar_path)), cache=tmp_path / "c")
    leftovers = list((tmp_path / "c").rglob("*")) if (tmp_path / "c").exists() else []
    assert [p for p in leftovers if p.is_file()] == []
