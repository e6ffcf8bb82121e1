"""The local Triton server (hrnet_triton.server, .reaper) and `hrnet-triton serve`, with real processes.

What is checked: nothing is left behind (tritonserver, its Python-backend stubs, their /dev/shm
regions, the backend folder, the ports) however the serving process or tritonserver ends; a
taken port, or another server answering, is refused; the admin APIs need the admin key while
inference does not; a stop is clean even with an idle keep-alive connection open.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import numpy as np
import pytest

from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV
from hrnet_core.errors import HrnetTritonError
from hrnet_triton.bench import model_stats
from hrnet_triton.cli import main
from hrnet_triton.server import LocalTritonServer, Ports, ServerError

ADMIN_KEY = "test-admin-key-0123456789"
TRIVIAL_MODEL = Path(__file__).resolve().parents[1] / "loadtest" / "trivial_repository" / "trivial"
MODEL = "trivial"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The load test's trivial model: a python-backend model (two stubs, each with its region) that loads at once."""
    path = tmp_path_factory.mktemp("server") / "repo"
    shutil.copytree(TRIVIAL_MODEL, path / MODEL)
    return path


@pytest.fixture(scope="module")
def locked(repo, serve_env, free_ports, tmp_path_factory):
    """A server started with the default arguments and a known admin key."""
    log = tmp_path_factory.mktemp("locked") / "triton.log"
    with LocalTritonServer(repo, serve_env=serve_env, ports=free_ports(), log_file=log, admin_key=ADMIN_KEY) as srv:
        yield srv


# -- helpers: processes, regions, ports ---------------------------------------------------------


def _live_group(pgid: int) -> list[int]:
    """The running (not zombie) processes of a process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _eventually(check: Callable[[], bool], within_s: float = 20) -> bool:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@dataclass(frozen=True)
class Started:
    """A running tritonserver, as its command line and its stubs' describe it."""

    pid: int
    regions: tuple[str, ...]  # each stub's /dev/shm region is its third argument
    backend_dir: Path

    @classmethod
    def of(cls, pid: int) -> Started:
        flags = dict(a.split("=", 1) for a in _argv(pid) if a.startswith("--") and "=" in a)
        stubs = [_argv(p) for p in _live_group(pid) if p != pid]
        regions = tuple(argv[2] for argv in stubs if argv and argv[0].endswith("triton_python_backend_stub"))
        assert len(regions) >= 2, f"tritonserver {pid} runs no Python-backend stubs"
        return cls(pid, regions, Path(flags["--backend-directory"]))

    @classmethod
    def child_of(cls, parent: int) -> Started:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            argv = _argv(int(stat.parent.name)) if ppid == parent else []
            if argv and argv[0].endswith("/tritonserver"):
                return cls.of(int(stat.parent.name))
        raise AssertionError(f"process {parent} has no tritonserver child")

    def left_behind(self, ports: Ports) -> list[str]:
        return [
            *(f"process {pid}" for pid in _live_group(self.pid)),
            *(f"/dev/shm/{name}" for name in self.regions if Path("/dev/shm", name).exists()),
            *([str(self.backend_dir)] if self.backend_dir.exists() else []),
            *(f"port {p}" for p in (ports.http, ports.grpc, ports.metrics) if not _port_free(p)),
        ]


def _serve(repo: Path, serve_env: Path, ports: Ports, out: Path, *extra: str) -> subprocess.Popen:
    """`hrnet-triton serve` in a subprocess (its own session), its output to ``out``; waits until it serves."""
    cmd = [sys.executable, "-m", "hrnet_triton.cli", "serve", "--repo", str(repo), "--serve-env", str(serve_env)]
    cmd += ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    with open(out, "wb") as fh:
        proc = subprocess.Popen([*cmd, *extra], stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if not _eventually(lambda: "Triton is serving" in out.read_text() or proc.poll() is not None, 120):
        proc.kill()
    assert "Triton is serving" in out.read_text(), out.read_text()[-3000:]
    return proc


def _kill_all(proc: subprocess.Popen, started: Started | None) -> None:
    for pgid in (proc.pid, *([started.pid] if started else [])):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# -- the serving process and tritonserver, however they end ------------------------------------


def test_serve_leaves_nothing_behind_when_stopped_with_sigterm(repo, serve_env, free_ports, tmp_path):
    ports, out = free_ports(), tmp_path / "serve.out"
    proc, started = _serve(repo, serve_env, ports, out), None
    try:
        started = Started.child_of(proc.pid)
        printed = out.read_text()
        assert f"listening on 127.0.0.1: HTTP http://127.0.0.1:{ports.http}" in printed
        assert f"export {ADMIN_KEY_ENV}=" in printed  # no key given: a random one, and how to use it
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert started.left_behind(ports) == []
    finally:
        _kill_all(proc, started)


def test_serve_leaves_nothing_behind_when_killed_with_sigkill(repo, serve_env, free_ports, tmp_path):
    ports = free_ports()
    proc, started = _serve(repo, serve_env, ports, tmp_path / "serve.out"), None
    try:
        started = Started.child_of(proc.pid)
        assert all(Path("/dev/shm", name).exists() for name in started.regions)
        proc.kill()
        proc.wait()
        assert _eventually(lambda: not started.left_behind(ports)), started.left_behind(ports)
    finally:
        _kill_all(proc, started)


def test_serve_reports_and_exits_non_zero_leaving_nothing_behind_when_tritonserver_is_killed(
    repo, serve_env, free_ports, tmp_path
):
    ports, out = free_ports(), tmp_path / "serve.out"
    proc, started = _serve(repo, serve_env, ports, out), None
    try:
        started = Started.child_of(proc.pid)
        os.kill(started.pid, signal.SIGKILL)
        assert proc.wait(60) == 1
        assert "hrnet-triton: error: tritonserver was killed by SIGKILL while serving; its log is above" in (
            out.read_text()
        )
        assert started.left_behind(ports) == []
    finally:
        _kill_all(proc, started)


def test_local_server_removes_stubs_and_regions_at_once_when_tritonserver_is_killed(
    repo, serve_env, free_ports, tmp_path
):
    server = LocalTritonServer(repo, serve_env=serve_env, ports=free_ports(), log_file=tmp_path / "triton.log")
    with server:
        started = Started.of(server.process.pid)
        os.kill(started.pid, signal.SIGKILL)
        # before stop(): the reaper saw tritonserver end, killed its stubs and removed their regions
        assert _eventually(lambda: started.left_behind(server.ports) == [str(started.backend_dir)])
        with pytest.raises(ServerError, match="tritonserver was killed by SIGKILL while serving; see its log"):
            server.wait()
    assert started.left_behind(server.ports) == []


def test_stop_lets_triton_exit_by_itself_when_an_idle_keep_alive_connection_is_open(
    repo, serve_env, free_ports, tmp_path
):
    server = LocalTritonServer(repo, serve_env=serve_env, ports=free_ports(), log_file=tmp_path / "triton.log")
    server.start()
    process, started = server.process, Started.of(server.process.pid)
    idle = http.client.HTTPConnection("127.0.0.1", server.ports.http, timeout=60)
    try:
        idle.request("GET", "/v2/health/ready")
        assert idle.getresponse().read() == b""  # the connection stays open, idle
        server.stop()
    finally:
        idle.close()
        server.stop()
    code = process.returncode
    assert code >= 0, f"tritonserver had to be killed ({code}): Triton's exit timeout is not shorter than stop's"
    assert started.left_behind(server.ports) == []


# -- refusing ports and strangers --------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0"])
def test_start_refuses_a_taken_port_before_starting_when_another_process_listens(repo, serve_env, free_ports, address):
    ports = free_ports()
    server = LocalTritonServer(repo, serve_env=serve_env, ports=ports)
    with socket.socket() as taken:
        taken.bind((address, ports.grpc))
        taken.listen()
        with pytest.raises(ServerError, match=rf"port {ports.grpc} \(gRPC\) on 127.0.0.1 is taken: another server"):
            server.start()
    assert server.process is None


def test_start_refuses_the_ports_when_another_server_runs_on_them(repo, serve_env, locked):
    with pytest.raises(ServerError, match=rf"port {locked.ports.http} \(HTTP\) on 127.0.0.1 is taken"):
        LocalTritonServer(repo, serve_env=serve_env, ports=locked.ports).start()
    with urllib.request.urlopen(f"{locked.http_url}/v2/health/ready", timeout=5) as r:
        assert r.status == 200  # and that one still serves


def test_start_refuses_the_server_when_it_answers_under_another_id(repo, serve_env, free_ports):
    class Stranger(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"name": "triton", "version": "2.51.0"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stranger)
    Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        other = free_ports()
        server = LocalTritonServer(
            repo, serve_env=serve_env, ports=Ports(httpd.server_address[1], other.grpc, other.metrics)
        )
        with pytest.raises(
            ServerError, match=r"another server answers at http://127.0.0.1:\d+ \(it calls itself 'triton'"
        ):
            server._check_identity()
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- the admin APIs ----------------------------------------------------------------------------


def _call(url: str, method: str, path: str, body: dict | None = None, key: str | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    headers = {ADMIN_HEADER: key} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data, headers, method=method), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


ADMIN_CALLS = [
    ("POST", "/v2/logging", {"log_verbose_level": 0}),
    ("GET", f"/v2/models/{MODEL}/stats", None),
    ("POST", "/v2/trace/setting", {}),
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/systemsharedmemory/status", None),
]


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS, ids=[p for _, p, _ in ADMIN_CALLS])
def test_admin_api_refuses_requests_when_the_admin_key_is_missing_or_wrong(locked, method, path, body):
    assert _call(locked.http_url, method, path, body) == 403
    assert _call(locked.http_url, method, path, body, key="not-the-key-0123456789") == 403
    assert _call(locked.http_url, method, path, body, key=ADMIN_KEY) == 200


def test_shared_memory_registration_is_refused_when_the_admin_key_is_missing(locked):
    from multiprocessing import shared_memory

    region = shared_memory.SharedMemory(name=f"lockdown-{os.getpid()}", create=True, size=4096)
    try:
        register = f"/v2/systemsharedmemory/region/{region.name}/register"
        body = {"key": f"/{region.name}", "offset": 0, "byte_size": 4096}
        assert _call(locked.http_url, "POST", register, body) == 403
        assert _call(locked.http_url, "POST", register, body, key=ADMIN_KEY) == 200
        unregister = f"/v2/systemsharedmemory/region/{region.name}/unregister"
        assert _call(locked.http_url, "POST", unregister, {}, key=ADMIN_KEY) == 200
    finally:
        region.close()
        region.unlink()


def test_grpc_admin_protocols_are_refused_when_the_admin_key_is_missing(locked):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{locked.ports.grpc}")
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_log_settings()
    assert client.get_log_settings(headers={f"triton-grpc-protocol-{ADMIN_HEADER}": ADMIN_KEY})
    assert client.is_model_ready(MODEL)  # health and metadata stay open


def test_inference_is_answered_when_no_admin_key_is_sent(locked):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{locked.ports.http}")
    x = httpclient.InferInput("x", [2, 3, 4, 4], "FP32")
    x.set_data_from_numpy(np.zeros((2, 3, 4, 4), np.float32))
    assert client.infer(MODEL, [x]).as_numpy("probabilities").shape == (2, 1000)


def test_server_listens_on_loopback_only_when_no_host_is_given(locked):
    for port in (locked.ports.http, locked.ports.grpc, locked.ports.metrics):
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()}
        assert addresses and addresses <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, listening


def test_bench_fails_naming_the_key_variable_when_the_admin_key_is_missing_or_wrong(
    locked, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    for key in (None, "not-the-key-0123456789"):
        with pytest.raises(HrnetTritonError, match=f"restricts its statistics API.*--admin-key or \\${ADMIN_KEY_ENV}"):
            model_stats(locked.http_url, MODEL, key)
    assert model_stats(locked.http_url, MODEL, ADMIN_KEY)["name"] == MODEL
    assert main(["bench", "--url", locked.http_url, "--model", MODEL, "--out", str(tmp_path)]) == 1
    assert ADMIN_KEY_ENV in capsys.readouterr().err
