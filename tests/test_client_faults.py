"""The client when things go wrong: a server killed mid-run (and restarted), many files, files that
are not files, tensors that are not numbers, and a server whose admin APIs need a key.

Every test runs a real tritonserver on the trivial model (the HRNet contract, no network: answers
come at once, so a run of hundreds of files takes seconds), its admin APIs restricted to
ADMIN_KEY. Servers are killed with SIGKILL; ``classify`` runs as a real process.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from hrnet_client.served_model import InferenceError, Protocol, ServerOverloadedError, admin_headers
from hrnet_client.triton import TritonClassifier
from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV, RESTRICTED_APIS
from hrnet_core.errors import HrnetTritonError
from hrnet_core.preprocess import preprocess_files
from hrnet_core.samples import sample_images
from hrnet_triton.cli import main
from hrnet_triton.server import LocalTritonServer

TRIVIAL = Path(__file__).resolve().parents[1] / "loadtest" / "trivial_repository" / "trivial"
ADMIN_KEY = "client-faults-admin-key-0123"
TENSOR_BYTES = 3 * 224 * 224 * 4


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The trivial model; "slow": the same taking 0.25 s a request, so that a server killed mid-run
    always has requests in flight; and "queued": slow, with a queue of one request (REJECT beyond)."""
    root = tmp_path_factory.mktemp("faults") / "repo"
    shutil.copytree(TRIVIAL, root / "trivial")
    shutil.copytree(TRIVIAL, root / "slow")
    config = root / "slow" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "trivial"', 'name: "slow"'))
    model = root / "slow" / "1" / "model.py"
    code = model.read_text().replace("import numpy as np", "import time\n\nimport numpy as np")
    model.write_text(
        code.replace("    def execute(self, requests):", "    def execute(self, requests):\n        time.sleep(0.25)")
    )
    shutil.copytree(root / "slow", root / "queued")
    config = root / "queued" / "config.pbtxt"
    queue = "dynamic_batching { default_queue_policy { max_queue_size: 1 } }"
    config.write_text(
        config.read_text().replace('name: "slow"', 'name: "queued"').replace("dynamic_batching { }", queue)
    )
    return root


def _server(repo: Path, serve_env: Path, ports, log: Path) -> LocalTritonServer:
    """A server with the admin APIs behind ADMIN_KEY, from explicit arguments."""
    apis = ",".join(RESTRICTED_APIS)
    args = [
        f"--model-repository={repo}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--exit-on-error=true",
        f"--http-restricted-api={apis}:{ADMIN_HEADER}={ADMIN_KEY}",
        f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={ADMIN_KEY}",
    ]
    return LocalTritonServer(repo, serve_env=serve_env, ports=ports, log_file=log, args=args)


@pytest.fixture(scope="module")
def server(repo, serve_env, free_ports, tmp_path_factory):
    with _server(repo, serve_env, free_ports(), tmp_path_factory.mktemp("log") / "triton.log") as srv:
        yield srv


def _url(server: LocalTritonServer, protocol: str) -> str:
    return f"127.0.0.1:{server.ports.http if protocol == 'http' else server.ports.grpc}"


def _images(folder: Path, n: int) -> list[str]:
    """``n`` image files: links to the sample photographs, in turn."""
    folder.mkdir()
    samples = sample_images()
    paths = []
    for i in range(n):
        sample = samples[i % len(samples)]
        (folder / f"img{i:04d}{sample.suffix}").symlink_to(sample)
        paths.append(str(folder / f"img{i:04d}{sample.suffix}"))
    return paths


def _classify(
    images: list[str],
    url: str,
    protocol: str,
    stderr: Path,
    *extra: str,
    model: str = "trivial",
    address_space: int | None = None,
) -> subprocess.Popen:
    """``hrnet-triton classify --json`` as a process, its stdout a pipe read as the run goes."""
    cmd = [sys.executable, "-m", "hrnet_triton.cli", "classify", *images, "--url", url, "--model", model]
    cmd += ["--protocol", protocol, "--json", "--top-k", "1", *extra]
    env = {**os.environ, ADMIN_KEY_ENV: ADMIN_KEY}

    def limit():
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    with open(stderr, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, preexec_fn=limit)


def _read_lines(proc: subprocess.Popen, n: int) -> list[str]:
    lines = []
    while len(lines) < n and (line := proc.stdout.readline()):
        lines.append(line)
    return lines


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> str:
    """The rest of the output (through the same buffer ``_read_lines`` used), once the process ends."""
    watchdog = threading.Timer(timeout_s, proc.kill)  # a hung client fails the test instead of hanging it
    watchdog.start()
    try:
        rest = proc.stdout.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return rest


def _kill(server: LocalTritonServer) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classify_accounts_for_every_file_when_the_server_is_killed_mid_run(
    protocol, repo, serve_env, free_ports, tmp_path
):
    images = _images(tmp_path / "images", 240)
    with _server(repo, serve_env, free_ports(), tmp_path / "triton.log") as srv:
        extra = ["--concurrency", "4", "--retry-seconds", "1"]
        proc = _classify(images, _url(srv, protocol), protocol, tmp_path / "err", *extra, model="slow")
        first = _read_lines(proc, 40)  # "[" and 39 answers: the run is under way
        _kill(srv)
        rest = _finish(proc)
    err = (tmp_path / "err").read_text()
    rows = json.loads("".join(first) + rest)
    assert proc.returncode == 2, err[-3000:]
    assert [r["image"] for r in rows] == images  # every file, in order
    answered, failed = [r for r in rows if r["top"]], [r for r in rows if r["error"]]
    assert len(answered) >= 39 and failed and len(answered) + len(failed) == len(images)
    assert all("lost the server" in r["error"] and "gave up after retrying for" in r["error"] for r in failed)
    assert "Traceback" not in err and "retrying in" in err


@pytest.mark.parametrize("protocol,shared_memory", [("http", False), ("grpc", True)], ids=["http", "grpc-shm"])
def test_classify_answers_every_file_when_the_server_restarts_within_the_retry_window(
    protocol, shared_memory, repo, serve_env, free_ports, tmp_path
):
    images = _images(tmp_path / "images", 240)
    ports = free_ports()
    srv = _server(repo, serve_env, ports, tmp_path / "triton.log").start()
    again = _server(repo, serve_env, ports, tmp_path / "triton-again.log")
    try:
        extra = ["--concurrency", "4", "--retry-seconds", "120", *(["--shared-memory"] if shared_memory else [])]
        proc = _classify(images, _url(srv, protocol), protocol, tmp_path / "err", *extra, model="slow")
        first = _read_lines(proc, 40)
        _kill(srv)
        srv.stop()  # what the killed server left (its stubs), so the ports are free again
        again.start()  # on the same ports, while the client waits
        rest = _finish(proc)
    finally:
        srv.stop()
        again.stop()
    err = (tmp_path / "err").read_text()
    rows = json.loads("".join(first) + rest)
    assert proc.returncode == 0, err[-3000:]
    assert [r["image"] for r in rows] == images and all(r["top"] and not r["error"] for r in rows)
    assert "lost the server" in err and "retrying in" in err and "Traceback" not in err


def test_classify_files_memory_stays_bounded_when_given_many_files(server, tmp_path):
    images = _images(tmp_path / "images", 300)
    with TritonClassifier(_url(server, "http"), "trivial", concurrency=2) as clf:
        tracemalloc.start()
        try:
            preds = clf.classify_files(images, k=1, batch_size=4)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(preds) == 300 and all(p.top for p in preds)
    # In flight: 2 × 2 lanes batches of 4 (16 tensors), each once stacked and once serialised for
    # HTTP. Holding every tensor, as before, peaked above 300.
    assert peak < 80 * TENSOR_BYTES, f"peak {peak / TENSOR_BYTES:.0f} tensors"


def test_classify_gives_fifos_and_devices_their_own_error_when_the_other_files_are_images(server, tmp_path):
    fifo, zero, folder = tmp_path / "pipe.jpg", tmp_path / "zero.jpg", tmp_path / "folder.png"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    folder.mkdir()
    good = [str(p) for p in sample_images()[:3]]
    done = threading.Event()

    def unblock_a_reader():  # a client that opens the FIFO blocking would hang: give it an end of file
        while not done.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader
                pass

    threading.Thread(target=unblock_a_reader, daemon=True).start()
    # a client that reads /dev/zero to its end stops at this address-space limit (MemoryError), not at the machine's
    proc = _classify(
        [str(fifo), good[0], str(zero), *good[1:], str(folder)],
        _url(server, "http"),
        "http",
        tmp_path / "err",
        address_space=4 << 30,
    )
    out = _finish(proc)
    done.set()
    rows = {Path(r["image"]).name: r for r in json.loads(out)}
    assert proc.returncode == 2, (tmp_path / "err").read_text()[-3000:]
    assert "not a regular file (a FIFO (named pipe))" in rows["pipe.jpg"]["error"]
    assert "not a regular file (a character device)" in rows["zero.jpg"]["error"]
    assert "not a regular file (a directory)" in rows["folder.png"]["error"]
    assert all(rows[Path(p).name]["top"] for p in good)


def test_run_retries_an_overloaded_model_when_the_retry_window_allows_it(server, caplog):
    x = np.repeat(preprocess_files(sample_images()[:1]), 64, axis=0)  # 8 requests of 8 at once
    url = _url(server, "http")
    with TritonClassifier(url, "queued", concurrency=8, retry_s=0) as clf:
        with pytest.raises(ServerOverloadedError, match=r"is overloaded.*\(not retried: --retry-seconds 0\)"):
            clf.run(x)
    with caplog.at_level(logging.WARNING, "hrnet_client.triton"):
        with TritonClassifier(url, "queued", concurrency=8, retry_s=120) as clf:
            assert clf.run(x).shape == (64, 1000)
    assert "is overloaded" in caplog.text and "retrying in" in caplog.text


def test_run_refuses_non_finite_tensors_when_given_them(server):
    x = preprocess_files(sample_images()[:3])
    with TritonClassifier(_url(server, "grpc"), "trivial", Protocol.GRPC) as clf:
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[1, 2, 100, 100] = bad
            with pytest.raises(InferenceError, match="1 of the 3 images in the batch hold NaN or infinite values"):
                clf.run(y)
            with pytest.raises(InferenceError, match="at index 1.*nothing was sent"):
                clf.run_batches([x[:1], y])
        assert clf.run(x).shape == (3, 1000)  # finite tensors still go


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shared_memory_registers_with_the_admin_key_when_the_server_restricts_it(protocol, server, monkeypatch, capsys):
    url, x = _url(server, protocol), preprocess_files(sample_images()[:2])
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    with pytest.raises(HrnetTritonError, match=f"sent no key .*Set {ADMIN_KEY_ENV}"):
        TritonClassifier(url, "trivial", protocol, shared_memory=True)
    with pytest.raises(HrnetTritonError, match=f"sent a key it refused .*Set {ADMIN_KEY_ENV}"):
        TritonClassifier(url, "trivial", protocol, shared_memory=True, admin_key="not-the-key-0123456789")
    with TritonClassifier(url, "trivial", protocol, shared_memory=True, admin_key=ADMIN_KEY, concurrency=2) as clf:
        assert clf.run(x).shape == (2, 1000)
        assert len(_regions(server)) == 4  # an input and an output per lane
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    with TritonClassifier(url, "trivial", protocol, shared_memory=True) as clf:
        assert clf.run(x).shape == (2, 1000)
    monkeypatch.delenv(ADMIN_KEY_ENV)
    args = ["classify", str(sample_images()[0]), "--url", url, "--protocol", protocol, "--model", "trivial"]
    assert main([*args, "--shared-memory", "--admin-key", ADMIN_KEY]) == 0
    assert _regions(server) == [] and not [f for f in os.listdir("/dev/shm") if f.startswith(f"hrnet-{os.getpid()}-")]


def _regions(server: LocalTritonServer) -> list[str]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(_url(server, "http"))
    status = client.get_system_shared_memory_status(headers=admin_headers(Protocol.HTTP, ADMIN_KEY))
    return sorted(r["name"] for r in status)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_model_error_lists_the_models_only_when_the_admin_key_is_set(protocol, server, monkeypatch):
    from hrnet_client.served_model import UnknownModelError

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    with pytest.raises(UnknownModelError, match=f"no model 'absent'.*lists its models only .*set {ADMIN_KEY_ENV}"):
        TritonClassifier(_url(server, protocol), "absent", protocol)
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    with pytest.raises(UnknownModelError, match="no model 'absent'.*it serves: queued, slow, trivial"):
        TritonClassifier(_url(server, protocol), "absent", protocol)
