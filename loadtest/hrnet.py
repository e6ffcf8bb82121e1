"""Locust load test for HRNet classifiers served by Triton, over HTTP or gRPC.

    locust -f loadtest/hrnet.py --host http://127.0.0.1:8000                      # web UI
    locust -f loadtest/hrnet.py --host http://127.0.0.1:8000 --headless -u 4 -t 60s \\
        --model HRNet_W18_C --protocol grpc --batch-size 8 --max-p95-ms 2000 --csv out/w18

Every option below also reads a ``LOCUST_…`` environment variable (``--batch-size`` ->
``LOCUST_BATCH_SIZE``) and shows in the web UI. gRPC talks to ``--grpc-port`` (default 8001)
on the ``--host``'s machine, unless the host is written ``grpc://HOST:PORT``.

Each user decodes and preprocesses the images once, when it starts, with the parameters from
the model's config on the server (as ``hrnet-triton classify`` does); ``--preprocess-in-loop``
moves that work into every request instead. Each request is reported to Locust under the
model's name, and each answer is checked: its shape, that every row is a probability
distribution, and that the top-1 class is in the label set. A wrong answer counts as a failure.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import LoadTestShape, User, events, task
from locust.runners import MasterRunner, WorkerRunner

from hrnet_client.served_model import Protocol, ServedModel, address, describe, new_client
from hrnet_core.contract import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError
from hrnet_core.preprocess import load_tensor
from hrnet_core.samples import sample_images

grpc_gevent.init_gevent()  # gRPC's own threads would block Locust's event loop otherwise

log = logging.getLogger("hrnet.loadtest")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class LoadTestSetupError(Exception):
    """The load test cannot start: a message for the person running it, not a traceback."""


# Every option, with its default and help; each also reads LOCUST_<NAME> (--batch-size: LOCUST_BATCH_SIZE).
OPTIONS: dict[str, dict] = {
    "--model": dict(default="HRNet_W18_C", help="the model's name on the server"),
    "--protocol": dict(
        choices=["http", "grpc"], default="http",
        help="how requests are sent: HTTP to --host, or gRPC to --grpc-port on --host's machine",
    ),
    "--grpc-port": dict(type=int, default=8001, help="gRPC port on the --host's machine (default 8001)"),
    "--batch-size": dict(type=int, default=1, help="images per request"),
    "--payload": dict(
        choices=["tensor", "tiny"], default="tensor",
        help="tensor: the preprocessed images; tiny: a 1x1-pixel tensor per image, to measure the harness itself "
        "against a model that accepts any size",
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
        self.options = options
        self.protocol = Protocol(options.protocol)
        self.files = _image_files(options.images)
        try:
            self.address = address(options.host, self.protocol, options.grpc_port)
            client = new_client(self.address, self.protocol)
            try:
                self.model: ServedModel = describe(client, self.address, self.protocol, options.model, retries=0)
            finally:
                client.close()
        except HrnetTritonError as err:
            raise LoadTestSetupError(str(err)) from err
        if options.batch_size > self.model.max_batch:
            raise LoadTestSetupError(
                f"--batch-size {options.batch_size} is above {options.model}'s max_batch_size {self.model.max_batch}"
            )
        self.tensors = [load_tensor(p, self.model.cfg) for p in self.files]


_workload: Workload | None = None


def workload(environment) -> Workload:
    global _workload
    if _workload is None:
        _workload = Workload(environment.parsed_options)
    return _workload


def _fail_setup(environment, err: Exception) -> None:
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
            f"expected probabilities of shape ({batch}, {NUM_CLASSES}), got {None if probs is None else probs.shape}"
        )
    if not np.isfinite(probs).all() or probs.min() < 0 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise AssertionError("the answer is not a probability distribution per image")
    if int(probs.argmax(axis=1).max()) >= NUM_CLASSES:
        raise AssertionError("top-1 class outside the label set")


def check_classification(entries: np.ndarray | None, batch: int, k: int) -> None:
    if entries is None or entries.shape != (batch, k):
        raise AssertionError(
            f"expected ({batch}, {k}) classification entries, got {None if entries is None else entries.shape}"
        )
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
        self.environment, self.model, self.k = environment, o.model, o.top_k
        self.request_type = work.protocol.value.upper()
        self.tc = work.protocol.module()
        self.client = new_client(work.address, work.protocol)

    def infer(self, batch: np.ndarray) -> None:
        start, error, length = time.perf_counter(), None, 0
        try:
            inp = self.tc.InferInput(INPUT_NAME, list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            out = self.tc.InferRequestedOutput(OUTPUT_NAME, class_count=self.k)
            answer = self.client.infer(self.model, [inp], outputs=[out]).as_numpy(OUTPUT_NAME)
            if self.k:
                check_classification(answer, len(batch), self.k)
            else:
                check_probabilities(answer, len(batch))
            length = answer.nbytes
        except Exception as err:  # noqa: BLE001 - every failure is reported to Locust, none escapes
            error = err
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=self.model,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=error,
            context={"images": len(batch)},
        )

    def close(self) -> None:
        self.client.close()


class TritonUser(User):
    """One closed-loop client: sends a request, waits for the answer, sends the next."""

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
            self.client.close()

    def _batch(self) -> np.ndarray:
        if self.tiny:
            return np.zeros((self.batch, 3, 1, 1), np.float32)
        picks = [next(self.next_images) for _ in range(self.batch)]
        if self.in_loop:
            return np.stack([load_tensor(self.work.files[i], self.work.model.cfg) for i in picks])
        return np.stack([self.work.tensors[i] for i in picks])

    @task
    def infer(self) -> None:
        self.client.infer(self._batch())


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
        ok = total.num_requests - total.num_failures
        seconds = max(total.last_request_timestamp - total.start_time, 1e-9)
        log.info(
            "%s over %s: %d requests (%d failed), %.1f requests/s, %.1f images/s answered, p50 %.0f ms, p95 %.0f ms",
            o.model,
            o.protocol,
            total.num_requests,
            total.num_failures,
            total.num_requests / seconds,
            ok * o.batch_size / seconds,
            total.get_response_time_percentile(0.5),
            total.get_response_time_percentile(0.95),
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
