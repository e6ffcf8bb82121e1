"""Start a real Triton server on this machine: the ``tritonserver`` binary of ``nvidia-pytriton``.

The wheel (installed with ``--no-deps``: only its binary is used) carries Triton 2.51.0 with
the ``python`` backend and one Python-backend stub per Python version. The server needs:

- ``LD_LIBRARY_PATH`` to include the wheel's ``nvidia_pytriton.libs``;
- a backend directory whose ``python/`` holds ``triton_python_backend_stub`` for the Python
  that will run the models;
- the serving environment's ``bin/`` first on ``PATH``: the stub imports numpy and
  onnxruntime from there, and it must have numpy<2 (see docs/repository.md).

``LocalTritonServer`` refuses taken ports and checks (``--id``) that the server answering is its
own; listens on 127.0.0.1 unless asked; restricts Triton's admin APIs to an admin key
(docs/security.md); and leaves nothing behind however the serving process ends (``reaper``).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from hrnet_core import release
from hrnet_core.contract import ADMIN_HEADER, ADMIN_KEY_ENV, RESTRICTED_APIS
from hrnet_core.errors import HrnetTritonError

from .reaper import Reaper, describe_exit, die_with_parent, reap, signal_group

log = logging.getLogger(__name__)

# On SIGTERM Triton waits this long for requests in flight AND open connections (an idle keep-alive
# one holds it the whole time), then exits. stop() waits STOP_GRACE_S more (unloading, stubs) before
# it kills, so Triton's timeout always expires first. A batch of 8 takes seconds on 2 cores.
EXIT_TIMEOUT_S = 10
STOP_GRACE_S = 20
TRITON_EXIT_TIMEOUT_S = 30  # Triton's own default, for servers started with other arguments
ADMIN_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,}")  # nothing that --http-restricted-api would split on


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


def resolve_admin_key(key: str | None) -> tuple[str, bool]:
    """The admin key: ``key``, else ``$HRNET_TRITON_ADMIN_KEY``, else a random one; and whether it was generated."""
    key = key or os.environ.get(ADMIN_KEY_ENV)
    if not key:
        return secrets.token_hex(24), True  # hex: never starts with "-", which argparse would take for an option
    if not ADMIN_KEY_PATTERN.fullmatch(key):
        raise ServerError(
            f"the admin key (--admin-key or {ADMIN_KEY_ENV}) must be at least 16 characters of A-Z a-z 0-9 . _ ~ -; "
            "make one with `python3 -c 'import secrets; print(secrets.token_hex(24))'`"
        )
    return key, False


def lockdown_args(admin_key: str) -> list[str]:
    """Triton's admin APIs behind the ``admin-key`` header; inference, health, metadata and model config stay open."""
    apis = ",".join(RESTRICTED_APIS)
    return [
        f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}",
        f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}",
    ]


def check_ports_free(host: str, ports: Ports) -> None:
    """Refuse, before starting, ports that another process listens on (``host`` or any address)."""
    named = {"HTTP": ports.http, "gRPC": ports.grpc, "metrics": ports.metrics}
    if len(set(named.values())) < len(named) or not all(0 < port < 65536 for port in named.values()):
        raise ServerError(f"the HTTP, gRPC and metrics ports must differ and lie in 1..65535, got {ports}")
    for name, port in named.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no owner
            try:
                sock.bind((host, port))
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise ServerError(f"cannot listen on {host}:{port} ({err.strerror}); check --host") from err
                raise ServerError(
                    f"port {port} ({name}) on {host} is taken: another server listens there, perhaps another "
                    "`hrnet-triton serve`; stop it, or choose free ports (--http-port, --grpc-port, --metrics-port)"
                ) from err


def _flag(args: Sequence[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return values[-1] if values else None


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
        host: str = "127.0.0.1",
        admin_key: str | None = None,
        exit_timeout_s: int = EXIT_TIMEOUT_S,
    ):
        """``log_file`` receives the server's output; ``forward_log`` passes it to this process's stdout.

        The default arguments listen on ``host`` only, restrict the admin APIs to ``admin_key``
        (else ``$HRNET_TRITON_ADMIN_KEY``, else a random key: ``admin_key_generated``) and give
        Triton ``exit_timeout_s``. ``args`` replaces them (and the repository, ports, metrics, exit
        on error); they must then name ``repository`` and ``ports`` themselves. Always added: the
        backend directory (the wheel's backends are not where a tritonserver install has them),
        the python backend's shared-memory prefix (so its regions can be removed) and ``--id``
        (unless ``args`` has one: it tells this server from another on the same port).

        ``start()`` must run on a thread that outlives the server: the server gets SIGKILL when
        the thread that started it ends (and ``hrnet_triton.reaper`` cleans up after it).
        """
        self.args = list(args) if args is not None else None
        self.repository = Path(repository)
        self.serve_env = Path(serve_env)
        self.ports = ports
        self.host = host
        self.log_file = log_file
        self.forward_log = forward_log
        token = secrets.token_hex(6)
        self.server_id = (_flag(self.args, "--id") if self.args else None) or f"hrnet-triton-{token}"
        self.shm_prefix = f"triton_python_backend_shm_region_hrnet_{token}_"
        if self.args is None:
            self.admin_key: str | None
            self.admin_key, self.admin_key_generated = resolve_admin_key(admin_key)
            self.exit_timeout_s = exit_timeout_s
        else:  # the caller's arguments say what is restricted
            self.admin_key, self.admin_key_generated = admin_key or os.environ.get(ADMIN_KEY_ENV), False
            self.exit_timeout_s = int(_flag(self.args, "--exit-timeout-secs") or TRITON_EXIT_TIMEOUT_S)
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._backend_dir: Path | None = None
        self._reaper: Reaper | None = None

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches the server: the loopback address for a wildcard ``host``."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def http_url(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"http://{host}:{self.ports.http}"

    def start(self, timeout_s: float = 120) -> LocalTritonServer:
        install = TritonInstall.find()
        if not (self.serve_env / "bin" / "python").exists():
            raise ServerError(f"{self.serve_env}: no serving environment there; create it with `make serve-env`")
        version = serve_env_python_version(self.serve_env)
        stub = install.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
        if not self.repository.is_dir():
            raise ServerError(f"{self.repository}: no model repository there; write one with `hrnet-triton repo`")
        check_ports_free(self.host, self.ports)
        self._backend_dir = Path(tempfile.mkdtemp(prefix="hrnet-triton-backends-"))
        try:
            shutil.copytree(install.python_backend, self._backend_dir / "python")
            shutil.copy2(stub, self._backend_dir / "python" / "triton_python_backend_stub")
            self._spawn([str(install.binary), *self._arguments()], self._environment(install))
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.serve_env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(install.libs), env.get("LD_LIBRARY_PATH")) if p)
        env.pop("PYTHONHOME", None)
        return env

    def _arguments(self) -> list[str]:
        always = [
            f"--backend-directory={self._backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.args is not None:
            return [*always, *self.args, *([] if _flag(self.args, "--id") else [f"--id={self.server_id}"])]
        assert self.admin_key is not None
        return [
            *always,
            f"--id={self.server_id}",
            f"--model-repository={self.repository}",
            *(f"--{kind}-address={self.host}" for kind in ("http", "grpc", "metrics")),
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-cpu-metrics=true",
            "--metrics-config=summary_latencies=true",  # p50..p99.9 latencies per model
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *lockdown_args(self.admin_key),
        ]

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        """tritonserver in a session of its own (a process group with its stubs), dying with its parent,
        and its reaper beside it."""
        out = open(self.log_file, "wb") if self.log_file else (None if self.forward_log else subprocess.DEVNULL)
        try:
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        finally:
            if self.log_file and out is not None:
                out.close()  # type: ignore[union-attr]
        assert self._backend_dir is not None
        self._reaper = Reaper.start(self.process.pid, self.shm_prefix, [self._backend_dir])

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver {describe_exit(self.process.returncode)} while starting{self._log_hint()}"
                )
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                    ready = resp.status == 200
            except (urllib.error.URLError, OSError):
                ready = False
            if ready:
                self._check_identity()
                log.info(
                    "Triton %s ready: HTTP %s, gRPC :%d, metrics :%d",
                    self.server_id,
                    self.http_url,
                    self.ports.grpc,
                    self.ports.metrics,
                )
                return
            time.sleep(0.5)
        raise ServerError(f"tritonserver did not become ready within {timeout_s:.0f} s{self._log_hint()}")

    def _check_identity(self) -> None:
        """The server that answers must be the one started here (``--id``), not another on the same port."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2", timeout=5) as resp:
                name = json.load(resp).get("name")
        except (OSError, ValueError) as err:
            name = f"unreadable: {err}"
        if name != self.server_id:
            raise ServerError(
                f"another server answers at {self.http_url} (it calls itself {name!r}, this one is "
                f"{self.server_id!r}); stop it, or choose free ports (--http-port, --grpc-port, --metrics-port)"
            )

    def _log_hint(self) -> str:
        if self.log_file:
            return f"; see its log in {self.log_file}"
        return "; its log is above" if self.forward_log else "; run with a log file to see why"

    def wait(self) -> NoReturn:
        """Block while the server serves. It never ends by itself: when it does (a crash, a kill), raise
        ServerError saying how; ``stop()`` then cleans up what it left."""
        assert self.process is not None
        code = self.process.wait()
        raise ServerError(
            f"tritonserver {describe_exit(code)} while serving{self._log_hint()}; its Python-backend stubs and "
            "shared memory are cleaned up; start it again"
        )

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the server and clean up after it; return tritonserver's exit code (None if it never started).

        SIGTERM to its process group, SIGKILL if it is still running after ``timeout_s`` (default:
        Triton's exit timeout plus STOP_GRACE_S). Then, always: SIGKILL to what is left of the group
        (stubs outlive a tritonserver that exited or was killed), and its ``/dev/shm`` regions and
        backend folder are removed.
        """
        wait_s = self.exit_timeout_s + STOP_GRACE_S if timeout_s is None else timeout_s
        if self.process is not None:
            if self.process.poll() is None:
                signal_group(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(wait_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver still runs %.0f s after SIGTERM: killing it", wait_s)
                    signal_group(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            self.returncode = self.process.returncode
        folders = [self._backend_dir] if self._backend_dir is not None else []
        done = reap(self.process.pid if self.process else None, self.shm_prefix, folders)
        log.debug("stopped tritonserver %s: %s", self.server_id, "; ".join(done) or "nothing left")
        if self._reaper is not None:
            self._reaper.disarm()
        self.process, self._reaper, self._backend_dir = None, None, None
        return self.returncode

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def admin_key_notice(server: LocalTritonServer) -> str | None:
    """For a generated admin key: how to use it (printed once, to stderr, by ``serve``)."""
    if not server.admin_key_generated:
        return None
    return (
        f"hrnet-triton: no admin key given (--admin-key or ${ADMIN_KEY_ENV}): this run's is random. Triton's admin "
        f"APIs ({', '.join(RESTRICTED_APIS)}) answer only requests with the header '{ADMIN_HEADER}: <key>'. "
        f"For `hrnet-triton bench` and shared-memory clients, in their shell:\n"
        f"  export {ADMIN_KEY_ENV}={server.admin_key}"
    )


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
