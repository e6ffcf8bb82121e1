"""A local ``tritonserver``'s lifetime: it ends, and is cleaned up after, however the process that started it ends.

``tritonserver`` runs in its own process group with its Python-backend stubs. The stubs outlive
a ``tritonserver`` killed with SIGKILL (they ignore SIGTERM and keep their ``/dev/shm``
regions), and a server started in its own session outlives a parent killed with SIGKILL. So
``LocalTritonServer`` starts this small process beside the server, in a session of its own::

    python -m hrnet_triton.reaper --pid PID --shm-prefix PREFIX --remove DIR

Its standard input is the read end of a pipe whose write end only the serving process holds.
When that process ends for any reason (even SIGKILL) the reaper reads end-of-file, kills the
server's whole process group with SIGKILL, removes ``/dev/shm/PREFIX*`` and the backend folder,
and exits. When ``tritonserver`` exits by itself (it watches a pidfd) the stubs and regions go
at once. A clean ``stop()`` cleans up itself and writes one byte, which disarms the reaper.

Also here: the parent-death signal ``tritonserver`` is started with, and how an exit is told.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
DISARM = b"x"
_PR_SET_PDEATHSIG = 1


def reap(pgid: int | None, shm_prefix: str, remove: Sequence[Path] = (), settle_s: float = 5.0) -> list[str]:
    """SIGKILL process group ``pgid``, remove ``/dev/shm/<shm_prefix>*`` and the ``remove`` folders.

    Safe to repeat. Waits up to ``settle_s`` for the group to be gone, so its ports are free on
    return. Returns what it did, for a log line.
    """
    done = []
    if pgid is not None and _group_alive(pgid):  # zombies, waiting for their parent, hold nothing
        try:
            os.killpg(pgid, signal.SIGKILL)
            done.append(f"killed process group {pgid}")
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
    if shm_prefix:
        for region in SHM_DIR.glob(f"{shm_prefix}*"):
            region.unlink(missing_ok=True)
            done.append(f"removed {region}")
    for folder in remove:
        if Path(folder).exists():
            shutil.rmtree(folder, ignore_errors=True)
            done.append(f"removed {folder}")
    return done


def _group_alive(pgid: int) -> bool:
    """True while a process of the group is running (zombies, waiting for their parent, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``, from a Popen return code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill this child
            os._exit(1)

    return preexec


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """``os.killpg``, quiet when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class Reaper:
    """The serving process's handle on its reaper: the process and the write end of its pipe."""

    process: subprocess.Popen
    pipe: int

    @classmethod
    def start(cls, pid: int, shm_prefix: str, remove: Sequence[Path]) -> Reaper:
        read, write = os.pipe()  # both ends non-inheritable: no other child of ours gets the write end
        cmd = [sys.executable, "-m", "hrnet_triton.reaper", "--pid", str(pid), "--shm-prefix", shm_prefix]
        cmd += [x for folder in remove for x in ("--remove", str(folder))]
        try:
            process = subprocess.Popen(cmd, stdin=read, stdout=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        return cls(process, write)

    def disarm(self, timeout_s: float = 10) -> None:
        """Tell the reaper that the server was stopped and cleaned up here; wait for it to exit."""
        try:
            os.write(self.pipe, DISARM)
        except OSError:  # it has already reaped a server that exited by itself, and is gone
            pass
        finally:
            os.close(self.pipe)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def watch(pid: int, shm_prefix: str, remove: Sequence[Path]) -> list[str]:
    """Block until standard input ends or disarms; reap when it ends, and reap the group as soon as ``pid`` exits.

    When tritonserver exits by itself its stubs and their regions go at once; the folders wait
    for the serving process, which may still be reading the server's log or cleaning up itself.
    """
    stdin, done = sys.stdin.fileno(), []
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd, done = None, reap(pid, shm_prefix)
    while True:
        ready, _, _ = select.select([stdin, *([pidfd] if pidfd is not None else [])], [], [])
        if stdin in ready:
            if os.read(stdin, 1) == DISARM:
                return done
            return done + reap(pid, shm_prefix, remove)  # end of file: the serving process is gone
        assert pidfd is not None
        os.close(pidfd)
        pidfd = None
        done += reap(pid, shm_prefix)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hrnet_triton.reaper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True, help="tritonserver's process id (its process group)")
    parser.add_argument("--shm-prefix", default="", help="the python backend's shared-memory region prefix")
    parser.add_argument("--remove", type=Path, action="append", default=[], help="a folder to remove")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only end-of-file or a dead server end it
    done = watch(args.pid, args.shm_prefix, args.remove)
    if done:
        try:
            print(f"hrnet-triton reaper: tritonserver {args.pid} gone: {'; '.join(done)}", file=sys.stderr)
        except OSError:  # the serving process's stderr may be gone with it
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
