"""The Locust users: one User class per protocol, so that Locust's class picker and its
command line (``locust -f loadtest/hrnet.py HrnetGrpcUser``) choose between HTTP and gRPC.

Which classes a run uses: the classes named on the command line or picked in the web UI's class
picker (``--class-picker``), as Locust does; when none is named, ``--protocol`` chooses (http,
grpc or both), read each time a run starts, so that the web UI's field works too
(``classes_of_run``, which the load shape hands to Locust).

Each user is a closed loop by default: it sends a request, waits for the answer, sends the next.
With ``--target-rps`` it is paced instead (Locust's ``constant_throughput``): the run's users share
the target rate, each sending at most one request at a time. After a failure a user waits first,
exponentially longer with each failure in a row (``--failure-backoff-ms``).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
from locust import User, constant_throughput, events, task
from locust.runners import MasterRunner

from hrnet_client.served_model import Protocol

from .clients import TritonLocustClient
from .workload import LoadTestSetupError, fail_setup, new_run, workload


class TritonUser(User):
    """What both protocols' users do; Locust runs only its subclasses (``abstract``)."""

    abstract = True
    protocol: Protocol
    failures_in_row = 0

    def wait_time(self) -> float:
        """After n failures in a row, --failure-backoff-ms * 2**(n-1), capped, with jitter (so that refused users
        do not come back in step); otherwise the open loop's pacing with --target-rps, or no wait at all."""
        o, n = self.environment.parsed_options, min(self.failures_in_row, 31)
        backoff_ms = min(o.failure_backoff_max_ms, o.failure_backoff_ms * 2.0 ** (n - 1)) if n else 0.0
        backoff = max(backoff_ms, 0.0) / 1000 * random.uniform(0.5, 1.0)
        if o.target_rps <= 0:
            return backoff
        paced = constant_throughput(o.target_rps / users_of_run(self.environment))(self)
        if backoff > paced:
            # constant_throughput times the next request from the end of the wait it recorded: record the
            # wait made, or it would count the backoff's excess as a late task and skip the next pause.
            self._cp_last_wait_time = backoff
            return backoff
        return paced

    def on_start(self) -> None:
        try:
            self.work = workload(self.environment, self.protocol)
        except LoadTestSetupError as err:
            fail_setup(self.environment, err)
            self.stop(force=True)
            return
        o = self.environment.parsed_options  # read now: the web UI may have changed them since the last run
        self.batch, self.tiny, self.in_loop = o.batch_size, o.payload == "tiny", o.preprocess_in_loop
        self.client = TritonLocustClient(self.environment, self.work, o.top_k)
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


class HrnetHttpUser(TritonUser):
    """Requests over HTTP to --host (tritonclient's HTTP client, on geventhttpclient)."""

    protocol = Protocol.HTTP


class HrnetGrpcUser(TritonUser):
    """Requests over gRPC to --grpc-port on --host's machine, or to a host written grpc://HOST:PORT."""

    protocol = Protocol.GRPC


def classes_of_run(environment) -> list[type[User]]:
    """The User classes this run uses: those named (command line or class picker), else --protocol's."""
    o, available = environment.parsed_options, list(environment.user_classes)
    if getattr(o, "user_classes", None) or o.protocol == "both":
        return available
    chosen = [c for c in available if getattr(c, "protocol", None) == o.protocol]  # a str enum: "http" matches
    return chosen or available


def protocols_of_run(environment) -> list[Protocol]:
    return list(dict.fromkeys(c.protocol for c in classes_of_run(environment) if issubclass(c, TritonUser)))


def users_of_run(environment) -> int:
    """The run's users, all processes together: the load shape's count (the master passes it to its
    workers with the other options), else (no shape: the class picker's "Default") this process's."""
    shaped = getattr(environment.parsed_options, "hrnet_run_users", 0) if environment.shape_class else 0
    return max(1, shaped or (environment.runner.target_user_count if environment.runner else 1))


@events.test_start.add_listener
def _check_before_start(environment, **_kwargs) -> None:
    """Forget the last run's workloads, then check this run's before any user starts. The master
    sends nothing to Triton: its workers check for themselves, with their own files."""
    new_run()
    if isinstance(environment.runner, MasterRunner):
        return
    try:
        for protocol in protocols_of_run(environment):
            workload(environment, protocol)
    except LoadTestSetupError as err:
        fail_setup(environment, err)
