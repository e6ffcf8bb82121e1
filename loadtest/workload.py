"""What the users of one process send, made from the run's options when the run starts.

The options are read when each run starts, never once at import: the web UI edits them between
runs (``environment.parsed_options``), and a worker receives the master's values with each run.
A ``Workload`` (the served model, its input, the images, preprocessed once) is made once per run
and per set of the options it depends on, and checked before any request is sent: a bad option, an
unknown model or an unusable image is one message, not a stack of greenlet tracebacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gevent
from locust import events
from locust.runners import MasterRunner, WorkerRunner

from hrnet_client.served_model import Protocol, ServedModel, address, choose
from hrnet_core.contract import INPUT_KINDS, NUM_CLASSES
from hrnet_core.errors import HrnetTritonError, ImageError
from hrnet_core.preprocess import try_load_tensor
from hrnet_core.samples import sample_images

from .clients import close_client, open_client

log = logging.getLogger("hrnet.loadtest")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

# The choices of the options that have them. The web UI offers them as lists, but a form posted
# by hand is not checked by Locust, so check_options checks them again.
CHOICES: dict[str, tuple[str, ...]] = {
    "protocol": ("http", "grpc", "both"),
    "input": ("best", *INPUT_KINDS),
    "payload": ("tensor", "tiny"),
    "shape": ("constant", "step", "ramp"),
}


class LoadTestSetupError(HrnetTritonError):
    """The load test cannot start: a message for the person running it, not a traceback."""


def check_options(o) -> None:
    """Refuse option values that argparse would have refused but the web UI's form lets through."""
    for name, allowed in CHOICES.items():
        if getattr(o, name) not in allowed:
            raise LoadTestSetupError(f"--{name} {getattr(o, name)!r}: choose one of {', '.join(allowed)}")
    limits = [
        (o.batch_size >= 1, "--batch-size must be >= 1"),
        (0 <= o.top_k <= NUM_CLASSES, f"--top-k must be within 0..{NUM_CLASSES}"),
        (0 < o.grpc_port < 65536, "--grpc-port must be a port number, 1..65535"),
        (o.target_rps >= 0, "--target-rps must be >= 0 (0: closed loop)"),
        (o.step_users >= 1 and o.step_seconds > 0 and o.ramp_seconds > 0, "--step-* and --ramp-seconds must be > 0"),
        (o.failure_backoff_ms >= 0 and o.failure_backoff_max_ms >= 0, "--failure-backoff-* must be >= 0"),
    ]
    wrong = [message for ok, message in limits if not ok]
    if wrong:
        raise LoadTestSetupError("; ".join(wrong))
    if not o.host:
        raise LoadTestSetupError("no --host: pass the Triton server, e.g. --host http://127.0.0.1:8000")


def _image_files(folder: str) -> list[Path]:
    if not folder:
        return sample_images()
    root = Path(folder)
    if not root.is_dir():
        raise LoadTestSetupError(f"--images {folder}: not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise LoadTestSetupError(
            f"--images {folder}: no images there (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            "point it at a folder of photographs, or leave it out for the bundled samples"
        )
    return files


class Workload:
    """What every user of one protocol sends in this process: made and checked once per run."""

    def __init__(self, o, protocol: Protocol):
        check_options(o)
        kind = "tensor" if o.payload == "tiny" else (None if o.input == "best" else o.input)
        self.protocol, self.files = protocol, _image_files(o.images)
        try:
            self.address = address(o.host, protocol, o.grpc_port)
            client = open_client(self.address, protocol)
            try:
                self.model: ServedModel = choose(client, self.address, protocol, o.model, kind, retries=0)
            finally:
                close_client(client)
        except HrnetTritonError as err:
            raise LoadTestSetupError(str(err)) from err
        if o.batch_size > self.model.max_batch:
            raise LoadTestSetupError(
                f"--batch-size {o.batch_size} is above {o.model}'s max_batch_size {self.model.max_batch}"
            )
        self.tensors = [self.model.input.loader(self.model.cfg)(p) for p in self.files]  # a bad file stops it here
        image = self.model.input.kind == "image"  # the files' bytes are sent undecoded: decode them here all the same
        checked = self.tensors + [try_load_tensor(p, self.model.cfg) for p in self.files if image]
        bad = list(dict.fromkeys(str(t) for t in checked if isinstance(t, ImageError)))
        if bad:
            raise LoadTestSetupError(
                f"--images {o.images or '(bundled)'}: {len(bad)} of {len(self.files)} files cannot be used: "
                f"{'; '.join(bad[:5])}{'; …' if len(bad) > 5 else ''}. Remove or replace them, or use another folder"
            )


# This run's workloads (or their setup errors, so that each is checked and reported once), by the
# options they are made from; emptied when a run starts, so that the next run reads its own options.
_workloads: dict[tuple, Workload | LoadTestSetupError] = {}
_KEY = (*CHOICES, "host", "grpc_port", "model", "images", "batch_size", "top_k", "target_rps")
_KEY += ("step_users", "step_seconds", "ramp_seconds", "failure_backoff_ms", "failure_backoff_max_ms")


def workload(environment, protocol: Protocol) -> Workload:
    """This run's workload for ``protocol``, made from the options as they are now."""
    o = environment.parsed_options
    key = (protocol, *(getattr(o, name, None) for name in _KEY))
    if key not in _workloads:
        try:
            _workloads[key] = Workload(o, protocol)
        except LoadTestSetupError as err:
            _workloads[key] = err
    found = _workloads[key]
    if isinstance(found, LoadTestSetupError):
        raise found
    return found


_logged: set[str] = set()

# The custom message (Locust's runner.send_message) by which a worker tells its master why it cannot start.
SETUP_ERROR_MESSAGE = "hrnet_setup_error"


def fail_setup(environment, err: Exception) -> None:
    """Report a setup error once. A worker sends it to its master, which logs it and decides for every
    worker; a headless (or --autostart) run then ends with exit 2, and a run started from the web UI
    stops, the UI (and its workers) staying up for the next try."""
    message, runner = str(err), environment.runner
    first = message not in _logged
    if first:
        _logged.add(message)
        log.error("%s", message)
    if runner is None:
        return
    if isinstance(runner, WorkerRunner):
        environment.process_exit_code = 2  # this worker's own status; the master's is what the run returns
        if first:
            runner.send_message(SETUP_ERROR_MESSAGE, message)
        return
    if isinstance(runner, MasterRunner) and not first:
        return  # another worker's report of the same error: the run is already ending
    o = environment.parsed_options
    if o is None or o.headless or o.autostart:
        environment.process_exit_code = 2
        if isinstance(runner, MasterRunner):
            gevent.spawn_later(0, runner.quit)  # not from the message handler, one of the greenlets quit kills
        else:
            runner.quit()
    else:
        gevent.spawn_later(0, runner.stop)  # not from inside the greenlet that runner.stop would kill


def _setup_error_from_worker(environment, msg, **_kwargs) -> None:
    """A worker's setup error, on its master: the same text from several workers is logged once."""
    fail_setup(environment, LoadTestSetupError(f"a worker cannot start: {msg.data}"))


@events.init.add_listener
def _hear_workers(environment, **_kwargs) -> None:
    """On a master: a worker's setup error is logged here too, and ends or stops the run (fail_setup)."""
    if isinstance(environment.runner, MasterRunner):
        environment.runner.register_message(SETUP_ERROR_MESSAGE, _setup_error_from_worker)


def new_run() -> None:
    """Forget the last run's workloads and errors: called when a run starts, so it reads its own options."""
    _workloads.clear()
    _logged.clear()
