"""The processes of a ``tune`` run: the ``tritonserver`` Model Analyzer starts, and stopping Model Analyzer.

Model Analyzer's local mode (``triton_launch_mode: local``) starts one server per model config
as ``triton_server_path ARGS…`` and stops it with SIGTERM (SIGKILL 5 s later). ``hrnet-triton
tune`` points ``triton_server_path`` at a small script that runs this module::

    python -m hrnet_triton.tune_launch --serve-env DIR -- --model-repository=… --http-port=… …

It starts the wheel's ``tritonserver`` through :class:`hrnet_triton.server.LocalTritonServer`
with exactly the arguments Model Analyzer passed (the wheel's backend directory, the serving
environment first on ``PATH`` and ``LD_LIBRARY_PATH`` are added there), so a server Model
Analyzer starts gets the same launch, port check and clean-up (the reaper) as ``serve``. It
serves until SIGTERM, then stops the server within a few seconds, before Model Analyzer's
own SIGKILL; if that comes anyway the reaper kills the server's process group.

Model Analyzer starts it in a session of its own, so nothing reaches it when Model Analyzer
itself is killed. So it watches its parent: once it is re-parented (Model Analyzer is gone),
it stops its server as on SIGTERM and exits, and the ports are free again.

:func:`stop_model_analyzer` is how ``tune`` stops Model Analyzer when the run is cut short.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .reaper import signal_group
from .server import LocalTritonServer, Ports, ServerError, sigterm_as_interrupt

# Model Analyzer kills its server 5 s after SIGTERM (SERVER_OUTPUT_TIMEOUT_SECS); stop before that.
STOP_TIMEOUT_S = 4
# How often the launcher checks that Model Analyzer, its parent, is still there.
PARENT_POLL_S = 0.5
# Model Analyzer's third SIGINT saves its checkpoint, stops its server (SIGTERM, SIGKILL 5 s later) and exits.
ANALYZER_INTERRUPTS = 3
ANALYZER_STOP_S = 15


def stop_model_analyzer(proc: subprocess.Popen) -> None:
    """Stop a ``model-analyzer`` started in a session of its own, and the server it started.

    First its own way out: three SIGINTs, half a second apart (a quicker second one would be
    merged with the first); the third saves its checkpoint, stops its server and exits. If it
    still runs ANALYZER_STOP_S later: SIGTERM to its process group, then SIGKILL 5 s later. A server
    it left behind stops by itself (:func:`watch_parent`). Another Ctrl-C meanwhile: SIGKILL at once.
    """
    try:
        for _ in range(ANALYZER_INTERRUPTS):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
                time.sleep(0.5)
        for sig, wait_s in ((signal.SIGTERM, ANALYZER_STOP_S), (signal.SIGKILL, 5.0)):
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, sig)
        proc.wait()
    except KeyboardInterrupt:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def watch_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """SIGTERM to this process (which stops its server) once it is re-parented: ``parent`` is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _value(args: Sequence[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    raise ServerError(f"Model Analyzer's server arguments lack {name}: {' '.join(args)}")


def _joined(args: Sequence[str]) -> list[str]:
    """``--flag value`` pairs (Model Analyzer's form) as ``--flag=value`` (LocalTritonServer's)."""
    out: list[str] = []
    for arg in args:
        if out and out[-1].startswith("--") and "=" not in out[-1] and not arg.startswith("--"):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hrnet_triton.tune_launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-env", type=Path, required=True, help="the numpy<2 environment of the python backend")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="tritonserver's arguments, after --")
    ns = parser.parse_args(argv)
    parent = os.getppid()
    args = _joined([a for a in ns.server_args if a != "--"])
    ports = Ports(*(int(_value(args, f"--{kind}-port")) for kind in ("http", "grpc", "metrics")))
    host = next((a.split("=", 1)[1] for a in args if a.startswith("--http-address=")), "127.0.0.1")
    repository = Path(_value(args, "--model-repository"))
    server = LocalTritonServer(repository, serve_env=ns.serve_env, ports=ports, args=args, host=host, forward_log=True)
    sigterm_as_interrupt()
    watch_parent(parent)
    try:
        server.start()
        server.wait()
    except KeyboardInterrupt:
        return 0
    except ServerError as err:
        print(f"hrnet-triton tune_launch: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        server.stop(timeout_s=STOP_TIMEOUT_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
