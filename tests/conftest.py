"""The test suite's shared toolbox: fixtures for exported models, free ports, the serving
environment, a real local Triton server, and running Locust.

Markers (declared in pyproject.toml): ``server`` is added here to every test that starts a
Triton server, Locust or a virtual environment (``-m 'not server'`` runs the fast unit tests
alone); ``slow`` and ``gpu`` are set by the tests themselves.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO_ROOT / "loadtest" / "hrnet.py"
TRIVIAL_MODEL = REPO_ROOT / "loadtest" / "trivial_repository" / "trivial"

# Fixtures that start real processes: a test using one of them is marked `server`.
SERVER_FIXTURES = {"cpu_server", "serve_env", "run_locust", "locust_command"}


def pytest_report_header(config: pytest.Config) -> str:
    """The free disk where the tests write: the suite's exported models and environments take
    about 1.4 GB at once (a passing test's directory is deleted when it ends: pyproject.toml)."""
    where = Path(config.option.basetemp or tempfile.gettempdir())
    while not where.exists():
        where = where.parent
    return f"free disk under {where}: {shutil.disk_usage(where).free / 1e9:.1f} GB"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Downloads and unpacked models go to a cache of this test session, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HRNET_TRITON_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.delenv("HRNET_TRITON_WEIGHTS_MIRROR", raising=False)
    yield
    mp.undo()


@dataclass(frozen=True)
class Exported:
    onnx: Path
    manifest: dict
    paddle_dir: Path


@pytest.fixture(scope="session")
def w18_offline(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """HRNet_W18_C exported once per session with offline weights (about a minute on 2 cores)."""
    import json

    from hrnet_build.export import export_onnx
    from hrnet_build.weights import WeightsSpec
    from hrnet_core import variants
    from hrnet_core.manifest import manifest_path

    out = tmp_path_factory.mktemp("w18") / "HRNet_W18_C.onnx"
    paddle_dir = out.parent / "paddle"
    export_onnx(
        variants.get("HRNet_W18_C"), WeightsSpec.parse("offline"), out, paddle_model_dir=paddle_dir, progress=False
    )
    return Exported(out, json.loads(manifest_path(out).read_text()), paddle_dir)


def free_ports():
    """Three distinct free ports (HTTP, gRPC, metrics), from one call so they cannot collide."""
    from hrnet_triton.server import Ports

    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = Ports(*(s.getsockname()[1] for s in socks))
    for s in socks:
        s.close()
    return ports


@pytest.fixture(name="free_ports", scope="session")
def _free_ports_fixture() -> Callable:
    return free_ports


@pytest.fixture(scope="session")
def serve_env() -> Path:
    """The numpy<2 environment Triton's python backend runs in (``make serve-env``)."""
    from hrnet_triton.server import ServerError, TritonInstall, default_serve_env

    env = default_serve_env()
    if not (env / "bin" / "python").exists():
        pytest.skip(f"no serving environment at {env}: run `make serve-env`")
    try:
        TritonInstall.find()
    except ServerError as err:
        pytest.skip(str(err))
    return env


@pytest.fixture(scope="session")
def cpu_server(w18_offline, serve_env, tmp_path_factory):
    """A real Triton (the wheel's tritonserver) serving the cpu target's HRNet_W18_C three ways
    (HRNet_W18_C; HRNet_W18_C_uint8 when the export wrote its ONNX model beside the float one;
    HRNet_W18_C_image with hrnet_preprocess, docs/inputs.md), and the trivial model that measures
    the load-test harness. Shared by the client, Locust and thin-server tests."""
    from hrnet_build.repository import Target, write_repository
    from hrnet_core import variants
    from hrnet_triton.server import LocalTritonServer

    root = tmp_path_factory.mktemp("served")
    write_repository(Target.CPU, [variants.get("HRNet_W18_C")], root / "repo", onnx_dir=w18_offline.onnx.parent)
    shutil.copytree(TRIVIAL_MODEL, root / "repo" / "trivial")
    with LocalTritonServer(root / "repo", serve_env=serve_env, ports=free_ports(), log_file=root / "triton.log") as srv:
        yield srv


@pytest.fixture
def locust_command() -> list[str]:
    """The command that runs loadtest/hrnet.py under Locust with this test environment's Python."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]


@pytest.fixture
def run_locust() -> Callable[..., subprocess.CompletedProcess]:
    """``run_locust(args, cwd, timeout=120, LOCUST_X=...)``: loadtest/hrnet.py under a real Locust,
    with no LOCUST_ variable of the caller's environment leaking in."""

    def run(args: list[str], cwd: Path, timeout: float = 120, **locust_env: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")} | locust_env
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    return run


def aggregated_row(prefix: Path) -> dict[str, str]:
    """The "Aggregated" row of a Locust ``--csv PREFIX`` run's ``PREFIX_stats.csv``."""
    with open(f"{prefix}_stats.csv", newline="") as fh:
        return next(row for row in csv.DictReader(fh) if row["Name"] == "Aggregated")


@pytest.fixture(name="aggregated", scope="session")
def _aggregated_fixture() -> Callable[[Path], dict[str, str]]:
    return aggregated_row


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few KB of a deflated all-zero image:
    decoding it for real would need width*height*3 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1_000_000, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(name="png_header_only", scope="session")
def _png_header_only_fixture() -> Callable[[int, int], bytes]:
    return png_header_only
