"""The ``tritonserver`` Model Analyzer starts in its local launch mode, run the project's way.

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
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .server import LocalTritonServer, Ports, ServerError, sigterm_as_interrupt

# Model Analyzer kills its server 5 s after SIGTERM (SERVER_OUTPUT_TIMEOUT_SECS); stop before that.
STOP_TIMEOUT_S = 4


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
    args = _joined([a for a in ns.server_args if a != "--"])
    ports = Ports(*(int(_value(args, f"--{kind}-port")) for kind in ("http", "grpc", "metrics")))
    host = next((a.split("=", 1)[1] for a in args if a.startswith("--http-address=")), "127.0.0.1")
    repository = Path(_value(args, "--model-repository"))
    server = LocalTritonServer(repository, serve_env=ns.serve_env, ports=ports, args=args, host=host, forward_log=True)
    sigterm_as_interrupt()
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
