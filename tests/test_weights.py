from __future__ import annotations

import builtins
import dataclasses
import hashlib
import os
import pickle
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import paddle
import pytest

from hrnet_build import download, weights
from hrnet_build.network import build
from hrnet_build.weights import WeightsKind, WeightsSpec
from hrnet_core import variants
from hrnet_core.errors import DownloadError, WeightsError
from hrnet_triton.cli import main

from httpfiles import FileServer, closed_port_url

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def pinned(name: str, sha256: str = PAYLOAD_SHA256) -> variants.Variant:
    """The variant with a pinned SHA-256 (the table's are all None: they could not be computed here)."""
    return dataclasses.replace(variants.get(name), pretrained_sha256=sha256)


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


class _Exploit:
    """Unpickles as a call of ``func(*args)``: what a crafted .pdparams does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    ("make", "forbidden"),
    [
        (lambda marker: _Exploit(os.system, f"touch {marker}"), "posix.system"),
        (lambda marker: _Exploit(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        (lambda marker: _Exploit(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
    ],
)
def test_load_pdparams_refuses_the_file_without_running_it_when_its_pickle_calls_code(tmp_path, make, forbidden):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.pdparams"
    path.write_bytes(pickle.dumps({"fc.weight": make(marker)}, protocol=4))
    with pytest.raises(WeightsError, match=rf"refused: its pickle asks for {forbidden}, which weights never need"):
        weights.load_pdparams(build(18, False), path)
    assert not marker.exists()


@pytest.mark.parametrize("form", ["protocol 2", "protocol 3", "protocol 4", "tensors as (name, array) tuples"])
def test_load_pdparams_gives_the_saved_outputs_when_paddle_saved_the_file(tmp_path, form):
    from paddle.framework.io import _pickle_save

    paddle.seed(3)
    saved, loaded = paddle.nn.Linear(6, 4), paddle.nn.Linear(6, 4)
    path = tmp_path / "linear.pdparams"
    if form.startswith("protocol"):
        paddle.save(saved.state_dict(), str(path), protocol=int(form[-1]))
    else:  # how paddle pickles a tensor outside a state dict
        with open(path, "wb") as fh:
            _pickle_save({"weight": saved.weight, "bias": saved.bias}, fh, 4)
    weights.load_pdparams(loaded, path)
    x = paddle.rand([2, 6])
    np.testing.assert_array_equal(loaded(x).numpy(), saved(x).numpy())


def test_load_pdparams_reads_numpy_1_pickles_when_numpy_2_is_installed(tmp_path):
    """PaddleClas's files were written under numpy 1, whose arrays name numpy.core.multiarray."""
    paddle.seed(4)
    saved, loaded = paddle.nn.Linear(6, 4), paddle.nn.Linear(6, 4)
    path = tmp_path / "linear.pdparams"
    paddle.save(saved.state_dict(), str(path), protocol=2)  # GLOBAL opcodes: "module\nname\n"
    data = path.read_bytes()
    if b"numpy._core.multiarray\n" in data:
        path.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
    weights.load_pdparams(loaded, path)
    np.testing.assert_array_equal(loaded.weight.numpy(), saved.weight.numpy())


def test_load_pdparams_names_the_entry_when_a_value_is_not_a_tensor(tmp_path):
    path = tmp_path / "checkpoint.pdparams"
    path.write_bytes(pickle.dumps({"fc.weight": np.zeros(3, np.float32), "epoch": 7}))
    with pytest.raises(WeightsError, match="entry 'epoch' is a int, not a numeric tensor"):
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
        weights.resolve(pinned("HRNet_W18_C"), WeightsSpec.parse("auto"), cache=tmp_path)


def test_auto_weights_download_from_the_mirror_path_of_paddleclas(tmp_path, monkeypatch):
    with FileServer({"/legendary_models/HRNet_W30_C_pretrained.pdparams": PAYLOAD}) as srv:
        monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", srv.url + "/")
        got = weights.resolve(pinned("HRNet_W30_C"), WeightsSpec.parse("auto"), cache=tmp_path, progress=False)
    assert got.kind is WeightsKind.PDPARAMS and got.path.read_bytes() == PAYLOAD
    assert got.source == f"{srv.url}/legendary_models/HRNet_W30_C_pretrained.pdparams"
    assert got.sha256 == PAYLOAD_SHA256


def test_auto_weights_refuse_to_download_when_no_hash_is_pinned(tmp_path, monkeypatch):
    with FileServer({"/legendary_models/HRNet_W30_C_pretrained.pdparams": PAYLOAD}) as srv:
        monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", srv.url)
        with pytest.raises(WeightsError, match=r"no SHA-256 is pinned for HRNet_W30_C .*--allow-unpinned-weights"):
            weights.resolve(variants.get("HRNet_W30_C"), WeightsSpec.parse("auto"), cache=tmp_path, progress=False)
    assert srv.requests == []


def test_auto_weights_download_an_unpinned_file_when_the_risk_is_accepted(tmp_path, monkeypatch):
    spec = WeightsSpec.parse("auto", allow_unpinned=True)
    with FileServer({"/legendary_models/HRNet_W30_C_pretrained.pdparams": PAYLOAD}) as srv:
        monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", srv.url)
        got = weights.resolve(variants.get("HRNet_W30_C"), spec, cache=tmp_path, progress=False)
    assert got.path.read_bytes() == PAYLOAD and got.sha256 == PAYLOAD_SHA256


def test_auto_weights_discard_the_download_when_it_differs_from_the_pin(tmp_path, monkeypatch):
    with FileServer({"/legendary_models/HRNet_W30_C_pretrained.pdparams": b"tampered" + PAYLOAD[8:]}) as srv:
        monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", srv.url)
        with pytest.raises(DownloadError, match=f"expected {PAYLOAD_SHA256}: the download was discarded"):
            weights.resolve(pinned("HRNet_W30_C"), WeightsSpec.parse("auto"), cache=tmp_path, progress=False)
    assert not list((tmp_path / "pdparams").glob("*.pdparams"))


def test_cli_export_refuses_unpinned_weights_when_the_flag_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", closed_port_url())
    assert main(["export", "HRNet_W18_C", "--out", str(tmp_path / "m.onnx"), "--cache-dir", str(tmp_path)]) == 1
    assert "accept the risk with `hrnet-triton export --allow-unpinned-weights`" in capsys.readouterr().err


def test_variant_rejects_a_pin_when_it_is_not_a_sha256():
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        pinned("HRNet_W18_C", "ABC")


@pytest.mark.parametrize("mirror", ["http://mirror.example.com/dygraph", "ftp://127.0.0.1/dygraph", "http://10.0.0.1"])
def test_weights_mirror_is_refused_when_it_is_not_https_to_a_remote_host(monkeypatch, mirror):
    monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", mirror)
    with pytest.raises(WeightsError, match="a weights mirror must be an https:// URL.*only for a loopback host"):
        weights.pretrained_url(variants.get("HRNet_W18_C"))


@pytest.mark.parametrize(
    "mirror", ["https://mirror.example.com/dygraph", "http://localhost:8000", "http://127.0.0.1:1/", "http://[::1]:80"]
)
def test_weights_mirror_is_used_when_it_is_https_or_loopback_http(monkeypatch, mirror):
    monkeypatch.setenv("HRNET_TRITON_WEIGHTS_MIRROR", mirror)
    url = weights.pretrained_url(variants.get("HRNet_W18_C"))
    assert url == mirror.rstrip("/") + "/legendary_models/HRNet_W18_C_pretrained.pdparams"


def test_fetch_refuses_plain_http_when_the_host_is_not_loopback(tmp_path):
    with pytest.raises(DownloadError, match="refusing to download over plain http"):
        download.fetch("http://mirror.example.com/w.pdparams", tmp_path / "w.pdparams", progress=False)


def test_fetch_refuses_a_redirect_when_it_leads_to_plain_http(tmp_path):
    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://mirror.example.com/w.pdparams")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/w.pdparams"
        with pytest.raises(
            DownloadError, match="redirects to http://mirror.example.com/w.pdparams, which is not https"
        ):
            download.fetch(url, tmp_path / "w.pdparams", progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()


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


def test_inference_tar_unpacking_says_to_upgrade_python_when_tarfile_lacks_the_data_filter(tmp_path, monkeypatch):
    """Python before 3.10.12 / 3.11.4: no tarfile.data_filter, and extractall takes no filter argument."""
    tar_path = _fake_infer_tar(tmp_path, {"HRNet_W18_C_infer/inference.pdiparams": b"p"})

    def old_extractall(self, path=".", members=None, *, numeric_owner=False):
        raise AssertionError("extracted without the data filter")

    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    with pytest.raises(WeightsError, match=r"needs tarfile's 'data' filter.*Use Python 3\.10\.12\+, 3\.11\.4\+"):
        weights.resolve(variants.get("HRNet_W18_C"), WeightsSpec.parse(str(tar_path)), cache=tmp_path / "c")


def test_corrupt_inference_tar_is_rejected_and_leaves_no_partial_directory(tmp_path):
    tar_path = tmp_path / "HRNet_W18_C_infer.tar"
    tar_path.write_bytes(b"\0" * 100 + b"not a tar" * 50)
    with pytest.raises(WeightsError, match="cannot unpack"):
        weights.resolve(variants.get("HRNet_W18_C"), WeightsSpec.parse(str(tar_path)), cache=tmp_path / "c")
    leftovers = list((tmp_path / "c").rglob("*")) if (tmp_path / "c").exists() else []
    assert [p for p in leftovers if p.is_file()] == []
