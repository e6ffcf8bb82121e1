"""Locust load test for HRNet classifiers served by Triton, over HTTP or gRPC.

    locust -f loadtest/hrnet.py --host http://127.0.0.1:8000                      # web UI
    locust -f loadtest/hrnet.py --host http://127.0.0.1:8000 --headless -u 4 -t 60s \\
        --model HRNet_W18_C --protocol grpc --batch-size 8 --max-p95-ms 2000 --csv out/w18

Every option below also reads a ``LOCUST_…`` environment variable (``--batch-size`` ->
``LOCUST_BATCH_SIZE``); docs/loadtest.md lists them. gRPC talks to ``--grpc-port`` (default 8001)
on the ``--host``'s machine, unless the host is written ``grpc://HOST:PORT``.

Each user decodes and preprocesses the images once, when it starts, with the parameters from
the model's config on the server (as ``hrnet-triton classify`` does); ``--preprocess-in-loop``
moves that work into every request instead. Each request is reported to Locust under the
model's name, and each answer is checked: its shape, that every row is a probability
distribution, and that the top-1 class is in the label set. A wrong answer counts as a failure,
after which the user backs off (``--failure-backoff-ms``). The end-of-run line gives the goodput.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import LoadTestShape, User, events, task
from locust.runners import MasterRunner, WorkerRunner

from hrnet_client.served_model import Protocol, ServedModel, address, choose, new_client
from hrnet_core.contract import INPUT_KINDS, NUM_CLASSES, OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError, ImageError
from hrnet_core.preprocess import try_load_tensor
from hrnet_core.samples import sample_images

grpc_gevent.init_gevent()  # gRPC's own threads would block Locust's event loop otherwise

log = logging.getLogger("hrnet.loadtest")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class LoadTestSetupError(HrnetTritonError):
    """The load test cannot start: a message for the person running it, not a traceback."""


class RequestFailed(HrnetTritonError):
    """A request the server failed, with the server's words: what Locust records and reports."""


# Every option, with its default and help; each also reads LOCUST_<NAME> (--batch-size: LOCUST_BATCH_SIZE).
OPTIONS: dict[str, dict] = {
    "--model": dict(default="HRNet_W18_C", help="the variant on the server, or a served model (HRNet_W18_C_image)"),
    "--input": dict(choices=INPUT_KINDS, help="what is sent: tensor, uint8 (the crop) or image (the files' bytes); "
                    "default: the best the server offers for --model, image, else uint8, else tensor"),
    "--protocol": dict(
        choices=["http", "grpc"], default="http",
        help="how requests are sent: HTTP to --host, or gRPC to --grpc-port on --host's machine",
    ),
    "--grpc-port": dict(type=int, default=8001, help="gRPC port on the --host's machine (default 8001)"),
    "--batch-size": dict(type=int, default=1, help="images per request"),
    "--payload": dict(
        choices=["tensor", "tiny"], default="tensor",
        help="tensor: the images, in --input's form; tiny: a 1x1-pixel float32 tensor per image (whatever "
        "--input), to measure the harness itself against a model that accepts any size",
    ),
    "--images": dict(default="", help="a folder of images (default: the bundled sample photographs)"),
    "--top-k": dict(
        type=int, default=0, help="ask the server for the top-k (classification extension); 0: full probabilities"
    ),
    "--preprocess-in-loop": dict(action="store_true", help="decode and preprocess on every request, not once per user"),
    "--shape": dict(
        choices=["constant", "step", "ramp"], default="constant",
        help="constant: -u users at once; step: add --step-users every --step-seconds up to -u; ramp: from 0 to -u "
        "users linearly over --ramp-seconds",
    ),
    "--step-users": dict(type=int, default=1, help="with --shape step: users added at each step (default 1)"),
    "--step-seconds": dict(type=float, default=30.0, help="with --shape step: seconds between steps (default 30)"),
    "--ramp-seconds": dict(type=float, default=60.0, help="with --shape ramp: seconds from 0 to -u users (default 60)"),
    "--failure-backoff-ms": dict(
        type=float, default=100.0,
        help="after a failed request the user waits this long (with jitter) before its next one, doubling with each "
        "failure in a row up to --failure-backoff-max-ms; a success resets it (default 100; 0: retry at once)",
    ),
    "--failure-backoff-max-ms": dict(type=float, default=5000.0, help="the longest wait after failures (default 5000)"),
    "--max-p95-ms": dict(
        type=float, default=0.0, help="exit non-zero if the 95th-percentile latency is above this (0: no limit)"
    ),
    "--max-failure-ratio": dict(
        type=float, default=-1.0,
        help="exit non-zero if more than this fraction of requests failed (default: any failure)",
    ),
}  # fmt: skip


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("HRNet on Triton")
    for flag, settings in OPTIONS.items():
        group.add_argument(flag, env_var="LOCUST_" + flag[2:].upper().replace("-", "_"), **settings)


# -- tritonclients: each closed exactly once, while gevent's hub runs. A gRPC client left open, or closed
# twice (its __del__ closes again), hangs the process at exit: docs/loadtest.md, "Why every client is closed once".

_open_clients: set = set()


def open_client(addr: str, protocol: Protocol):
    client = new_client(addr, protocol)
    _open_clients.add(client)
    return client


def close_client(client) -> None:
    if client not in _open_clients:
        return
    _open_clients.discard(client)
    try:
        client.close()
    except Exception as err:  # noqa: BLE001 - a client that cannot close cleanly is still done with
        log.warning("closing a %s client failed (%s); the run goes on", type(client).__module__, err)
    finally:
        client.close = lambda: None  # so that tritonclient's __del__ does not close it a second time


@events.test_stop.add_listener
@events.quitting.add_listener
def close_every_client(**_kwargs) -> None:
    """Close the clients that no user closed (a user stopped mid-start, say), before the process exits."""
    for client in list(_open_clients):
        close_client(client)


# -- setup shared by all users of one process ---------------------------------------------------


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
    """What every user of a process sends: checked once per process, before any user starts."""

    def __init__(self, options):
        if options.batch_size < 1 or options.top_k < 0 or options.top_k > NUM_CLASSES:
            raise LoadTestSetupError("--batch-size must be >= 1 and --top-k within 0..1000")
        if not options.host:
            raise LoadTestSetupError("no --host: pass the Triton server, e.g. --host http://127.0.0.1:8000")
        self.protocol, kind = Protocol(options.protocol), "tensor" if options.payload == "tiny" else options.input
        self.files = _image_files(options.images)
        try:
            self.address = address(options.host, self.protocol, options.grpc_port)
            client = open_client(self.address, self.protocol)
            try:
                self.model: ServedModel = choose(client, self.address, self.protocol, options.model, kind, retries=0)
            finally:
                close_client(client)
        except HrnetTritonError as err:
            raise LoadTestSetupError(str(err)) from err
        if options.batch_size > self.model.max_batch:
            raise LoadTestSetupError(
                f"--batch-size {options.batch_size} is above {options.model}'s max_batch_size {self.model.max_batch}"
            )
        self.tensors = [self.model.input.loader(self.model.cfg)(p) for p in self.files]  # a bad file stops it here
        image = self.model.input.kind == "image"  # the files' bytes are sent undecoded: decode them here all the same
        checked = self.tensors + [try_load_tensor(p, self.model.cfg) for p in self.files if image]
        bad = list(dict.fromkeys(str(t) for t in checked if isinstance(t, ImageError)))
        if bad:
            raise LoadTestSetupError(
                f"--images {options.images or '(bundled)'}: {len(bad)} of {len(self.files)} files cannot be used: "
                f"{'; '.join(bad[:5])}{'; …' if len(bad) > 5 else ''}. Remove or replace them, or use another folder"
            )


_workload: Workload | LoadTestSetupError | None = None


def workload(environment) -> Workload:
    """This process's workload, made once; a setup failure is kept too, so it is reported once."""
    global _workload
    if _workload is None:
        try:
            _workload = Workload(environment.parsed_options)
        except LoadTestSetupError as err:
            _workload = err
    if isinstance(_workload, LoadTestSetupError):
        raise _workload
    return _workload


def _fail_setup(environment, err: Exception) -> None:
    if environment.process_exit_code != 2:
        log.error("%s", err)
    environment.process_exit_code = 2
    if environment.runner is not None:
        environment.runner.quit()


@events.test_start.add_listener
def _check_before_start(environment, **_kwargs) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # workers check for themselves, with their own files
    try:
        workload(environment)
    except LoadTestSetupError as err:
        _fail_setup(environment, err)


# -- the answer checks and the client that reports to Locust ---------------------------------------


def check_probabilities(probs: np.ndarray | None, batch: int) -> None:
    if probs is None or probs.shape != (batch, NUM_CLASSES):
        raise AssertionError(
            f"expected probabilities of shape ({batch}, {NUM_CLASSES}), got {getattr(probs, 'shape', None)}"
        )
    if not np.isfinite(probs).all() or probs.min() < 0 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise AssertionError("the answer is not a probability distribution per image")
    if int(probs.argmax(axis=1).max()) >= NUM_CLASSES:
        raise AssertionError("top-1 class outside the label set")


def check_classification(entries: np.ndarray | None, batch: int, k: int) -> None:
    if entries is None or entries.shape != (batch, k):
        raise AssertionError(f"expected ({batch}, {k}) classification entries, got {getattr(entries, 'shape', None)}")
    for row in entries:
        probs = []
        for entry in row:
            value, class_id, label = (entry.decode().split(":", 2) + [""])[:3]
            if not 0 <= int(class_id) < NUM_CLASSES or not label:
                raise AssertionError(f"class {class_id!r} ({label!r}) outside the label set")
            probs.append(float(value))
        if probs != sorted(probs, reverse=True) or not 0 <= probs[-1] <= probs[0] <= 1:
            raise AssertionError(f"top-k probabilities out of order or range: {probs}")


class TritonLocustClient:
    """A tritonclient that reports every request to Locust, with its answer checked."""

    def __init__(self, environment, work: Workload):
        o = environment.parsed_options
        self.environment, self.model, self.k = environment, work.model.name, o.top_k  # the served model chosen
        self.request_type, self.spec = work.protocol.value.upper(), work.model.input
        self.tc = work.protocol.module()
        self.client = open_client(work.address, work.protocol)

    def infer(self, batch: np.ndarray) -> bool:
        """Send one request, check its answer, report it to Locust; whether it was answered correctly."""
        start, error, length = time.perf_counter(), None, 0
        try:
            inp = self.spec.request(self.tc, batch)  # tensor, uint8 crop or the files' bytes (hrnet_client.inputs)
            out = self.tc.InferRequestedOutput(OUTPUT_NAME, class_count=self.k)
            answer = self.client.infer(self.model, [inp], outputs=[out]).as_numpy(OUTPUT_NAME)
            if self.k:
                check_classification(answer, len(batch), self.k)
            else:
                check_probabilities(answer, len(batch))
            length = answer.nbytes
        except Exception as err:  # noqa: BLE001 - every failure is reported to Locust, none escapes
            error = _reported(err)
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=self.model,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=error,
            context={"images": len(batch)},
        )
        return error is None

    def close(self) -> None:
        close_client(self.client)


def _reported(err: Exception) -> Exception:
    """What Locust records for a failed request: tritonclient's InferenceServerException has no args,
    so its repr (Locust's error text) would be a bare "InferenceServerException()"."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(err, InferenceServerException):
        return err
    message = str(err) or "the server failed the request and gave no reason"
    if any(m in message.lower() for m in ("exceeds maximum queue size", "request timeout expired")):
        message += "; the model's queue is full: fewer users (-u), or a larger queue (repo --max-queue-size)"
    return RequestFailed(message)


class TritonUser(User):
    """One closed-loop client: sends a request, waits for the answer, sends the next; after a
    failure it waits first, exponentially longer with each failure in a row."""

    failures_in_row = 0

    def wait_time(self) -> float:
        """No wait after a success; after n failures in a row, --failure-backoff-ms * 2**(n-1), capped, with jitter
        (so that refused users do not come back in step)."""
        o, n = self.environment.parsed_options, min(self.failures_in_row, 31)
        delay_ms = min(o.failure_backoff_max_ms, o.failure_backoff_ms * 2.0 ** (n - 1)) if n else 0.0
        return max(delay_ms, 0.0) / 1000 * random.uniform(0.5, 1.0)

    def on_start(self) -> None:
        try:
            self.work = workload(self.environment)
        except LoadTestSetupError as err:
            _fail_setup(self.environment, err)
            self.stop(force=True)
            return
        o = self.environment.parsed_options
        self.batch, self.tiny, self.in_loop = o.batch_size, o.payload == "tiny", o.preprocess_in_loop
        self.client = TritonLocustClient(self.environment, self.work)
        self.next_images = itertools.cycle(range(len(self.work.files)))

    def on_stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()  # also closed at test_stop/quitting if this never runs

    def _batch(self) -> np.ndarray:
        if self.tiny:
            return np.zeros((self.batch, 3, 1, 1), np.float32)
        picks = [next(self.next_images) for _ in range(self.batch)]
        if self.in_loop:
            return np.stack([self.work.model.input.load(self.work.files[i], self.work.model.cfg) for i in picks])
        return np.stack([self.work.tensors[i] for i in picks])

    @task
    def infer(self) -> None:
        self.failures_in_row = 0 if self.client.infer(self._batch()) else self.failures_in_row + 1


# -- load shapes ---------------------------------------------------------------------------------


class HrnetShape(LoadTestShape):
    """--shape constant | step | ramp, over Locust's own -u (users), -r (spawn rate) and -t."""

    use_common_options = True

    def tick(self):
        o = self.runner.environment.parsed_options
        users, rate = o.num_users or 1, o.spawn_rate or 1
        t = self.get_run_time()
        if o.run_time and t >= o.run_time:
            return None  # with a shape class, Locust leaves -t to the shape
        if o.shape == "step":
            return min(users, o.step_users * (1 + int(t // o.step_seconds))), max(rate, o.step_users)
        if o.shape == "ramp":
            target = max(1, min(users, round(users * t / o.ramp_seconds)))
            return target, max(rate, users / o.ramp_seconds)
        return users, rate


# -- reporting and thresholds --------------------------------------------------------------------


@events.quitting.add_listener
def _report_and_judge(environment, **_kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.process_exit_code == 2:
        return
    o = environment.parsed_options
    total = environment.stats.total
    if total.num_requests:
        ok = total.num_requests - total.num_failures  # a wrong answer is a failure: ok counts correct answers
        seconds = max(total.last_request_timestamp - total.start_time, 1e-9)
        p50, p95 = total.get_response_time_percentile(0.5), total.get_response_time_percentile(0.95)
        log.info(
            f"{o.model} over {o.protocol}: {total.num_requests} requests ({total.num_failures} failed), "
            f"{total.num_requests / seconds:.1f} requests/s, goodput {ok * o.batch_size / seconds:.1f} images/s "
            f"answered correctly, p50 {p50:.0f} ms, p95 {p95:.0f} ms"
        )
    crossed = []
    if o.max_p95_ms and total.num_requests and total.get_response_time_percentile(0.95) > o.max_p95_ms:
        crossed.append(f"p95 latency {total.get_response_time_percentile(0.95):.0f} ms > --max-p95-ms {o.max_p95_ms:g}")
    if o.max_failure_ratio >= 0 and total.fail_ratio > o.max_failure_ratio:
        crossed.append(f"failure ratio {total.fail_ratio:.3f} > --max-failure-ratio {o.max_failure_ratio:g}")
    if not total.num_requests:
        crossed.append("no request was made")
    if crossed:
        log.error("threshold crossed: %s", "; ".join(crossed))
        environment.process_exit_code = 3
    elif o.max_failure_ratio >= 0 and environment.process_exit_code is None:
        environment.process_exit_code = 0  # failures within the allowed ratio do not fail the run


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run this file with Locust: locust -f loadtest/hrnet.py --host http://127.0.0.1:8000")
