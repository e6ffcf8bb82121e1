"""Start a real Triton server on this machine: the ``tritonserver`` binary of ``nvidia-pytriton``.

The wheel (installed with ``--no-deps``: only its binary is used) carries Triton 2.51.0 with
the ``python`` backend and one Python-backend stub per Python version. The server needs:

- ``LD_LIBRARY_PATH`` to include the wheel's ``nvidia_pytriton.libs``;
- a backend directory whose ``python/`` holds ``triton_python_backend_stub`` for the Python
  that will run the models;
- the serving environment's ``bin/`` first on ``PATH``: the stub imports numpy and
  onnxruntime from there, and it must have numpy<2 (see docs/repository.md).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hrnet_core import release
from hrnet_core.errors import HrnetTritonError

log = logging.getLogger(__name__)


class ServerError(HrnetTritonError):
    """The local Triton server cannot be started or did not become ready."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    libs: Path
    python_backend: Path
    stubs: Path

    @classmethod
    def find(cls) -> TritonInstall:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise ServerError(
                "no tritonserver found: install the nvidia-pytriton wheel for its binary with "
                f"`pip install --no-deps nvidia-pytriton=={release.PYTRITON_VERSION}`"
            )
        root = Path(spec.origin).parent
        install = cls(
            binary=root / "tritonserver" / "bin" / "tritonserver",
            libs=root.parent / "nvidia_pytriton.libs",
            python_backend=root / "tritonserver" / "backends" / "python",
            stubs=root / "tritonserver" / "python_backend_stubs",
        )
        for path in (install.binary, install.libs, install.python_backend):
            if not path.exists():
                raise ServerError(f"the nvidia-pytriton wheel at {root} lacks {path.name}; reinstall it")
        return install


def serve_env_python_version(serve_env: Path) -> str:
    out = subprocess.run(
        [str(serve_env / "bin" / "python"), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


class LocalTritonServer:
    """A ``tritonserver`` child process on a model repository; a context manager."""

    def __init__(
        self,
        repository: Path,
        *,
        serve_env: Path,
        ports: Ports = Ports(),
        log_file: Path | None = None,
        forward_log: bool = False,
        args: Sequence[str] | None = None,
    ):
        """``log_file`` receives the server's output; ``forward_log`` passes it to this process's stdout.

        ``args`` replaces the default server arguments (repository, ports, metrics, exit on error);
        they must then name ``repository`` and ``ports`` themselves. The backend directory is
        always added, since the wheel's backends are not where a tritonserver install has them.
        """
        self.args = list(args) if args is not None else None
        self.repository = Path(repository)
        self.serve_env = Path(serve_env)
        self.ports = ports
        self.log_file = log_file
        self.forward_log = forward_log
        self.process: subprocess.Popen | None = None
        self._backends: tempfile.TemporaryDirectory | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    def start(self, timeout_s: float = 120) -> LocalTritonServer:
        install = TritonInstall.find()
        if not (self.serve_env / "bin" / "python").exists():
            raise ServerError(f"{self.serve_env}: no serving environment there; create it with `make serve-env`")
        version = serve_env_python_version(self.serve_env)
        stub = install.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
        self._backends = tempfile.TemporaryDirectory(prefix="hrnet-triton-backends-")
        backend_dir = Path(self._backends.name)
        shutil.copytree(install.python_backend, backend_dir / "python")
        shutil.copy2(stub, backend_dir / "python" / "triton_python_backend_stub")

        env = dict(os.environ)
        env["PATH"] = f"{self.serve_env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(install.libs), env.get("LD_LIBRARY_PATH")) if p)
        env.pop("PYTHONHOME", None)
        default_args = [
            f"--model-repository={self.repository}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-cpu-metrics=true",
            "--exit-on-error=true",
        ]
        cmd = [
            str(install.binary),
            f"--backend-directory={backend_dir}",
            *(self.args if self.args is not None else default_args),
        ]
        if not self.repository.is_dir():
            raise ServerError(f"{self.repository}: no model repository there; write one with `hrnet-triton repo`")
        out = open(self.log_file, "wb") if self.log_file else (None if self.forward_log else subprocess.DEVNULL)
        self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} while starting{self._log_hint()}"
                )
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                    if resp.status == 200:
                        log.info(
                            "Triton ready: HTTP %s, gRPC :%d, metrics :%d",
                            self.http_url,
                            self.ports.grpc,
                            self.ports.metrics,
                        )
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver did not become ready within {timeout_s:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_file:
            return f"; see its log in {self.log_file}"
        return "; its log is above" if self.forward_log else "; run with a log file to see why"

    def wait(self) -> int:
        """Block until the server exits (returns its exit code)."""
        assert self.process is not None
        return self.process.wait()

    def stop(self, timeout_s: float = 30) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its Python stubs
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._backends is not None:
            self._backends.cleanup()
            self._backends = None

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def default_serve_env() -> Path:
    """``$HRNET_TRITON_SERVE_ENV``, else ``.venv-serve`` beside the running interpreter's venv."""
    env = os.environ.get("HRNET_TRITON_SERVE_ENV")
    if env:
        return Path(env)
    return Path(sys.prefix).parent / ".venv-serve"


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C, so a server is stopped by the same clean-up path."""

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
