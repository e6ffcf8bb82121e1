"""The lanes a :class:`~hrnet_client.triton.TritonClassifier` sends on, and how they ride out faults.

A lane is a thread with its own connection (tritonclient's HTTP client is gevent-based and must
stay on the thread that made it) and, with shared memory, its own regions. It takes batches
from a queue shared by all lanes and answers each batch's future.

A batch whose request finds no server (refused, reset, closed mid-answer, gRPC UNAVAILABLE) or
an overloaded model is sent again with exponential backoff (0.5 s doubling to 5 s, on a fresh
connection, its shared memory registered again) until ``retry_s`` seconds after the outage
began; all lanes share its start, so once the server has been gone that long every batch fails
at once. A batch of encoded images that the server fails for another reason is sent again one
image at a time, so that the image at fault gets the error and the others their answers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from hrnet_core.contract import NUM_CLASSES
from hrnet_core.errors import HrnetTritonError

from . import shared_memory
from .served_model import BACKOFF_S, InferenceError, ServerOverloadedError, ServerUnavailableError

if TYPE_CHECKING:
    from .triton import TritonClassifier

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0


class Outage:
    """When the lanes last found the server gone, shared so that one outage has one deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None

    def begin(self, now: float) -> float:
        with self._lock:
            if self._since is None:
                self._since = now
            return self._since

    def end(self) -> None:
        with self._lock:
            self._since = None


def _gave_up(err: HrnetTritonError, waited_s: float, retry_s: float) -> HrnetTritonError:
    if retry_s <= 0:
        return type(err)(f"{err} (not retried: --retry-seconds 0)")
    if isinstance(err, ServerUnavailableError):
        return type(err)(
            f"{err}; gave up after retrying for {waited_s:.0f} s (--retry-seconds {retry_s:g}). "
            "Restart the server, or wait longer for it with a larger --retry-seconds"
        )
    return type(err)(f"{err}; still refused after retrying for {waited_s:.0f} s (--retry-seconds {retry_s:g})")


class Lane(threading.Thread):
    """A worker thread with its own client (and shared memory), taking jobs from a shared queue."""

    def __init__(self, owner: TritonClassifier, index: int, jobs: queue.SimpleQueue):
        super().__init__(name=f"triton-lane-{index}", daemon=True)
        self.owner, self.index, self.jobs = owner, index, jobs
        self.ready: Future[None] = Future()
        self.client = None
        self.region: shared_memory.Regions | None = None
        self.stale = False  # the connection broke: reconnect (and register again) before the next request

    def run(self) -> None:
        owner = self.owner
        try:
            self.client = owner._new_client()
            if owner.shared_memory:
                per_image = owner.input.image_bytes
                self.region = shared_memory.create(
                    self.index, owner.max_batch * per_image, owner.max_batch * NUM_CLASSES * 4
                )
                shared_memory.register(self.client, self.region, owner.protocol, owner._admin_key, owner.address)
        except Exception as err:  # reported to the constructor through `ready`
            self._release()
            self.ready.set_exception(err)
            return
        self.ready.set_result(None)
        try:
            while (job := self.jobs.get()) is not None:
                batch, k, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(self._answer_each(batch, k))
                    except BaseException as err:
                        future.set_exception(err)
                del job, batch
        finally:
            self._release()

    def _release(self) -> None:
        owner = self.owner
        if self.region is not None:
            shared_memory.release(self.client, self.region, owner.protocol, owner._admin_key)
        if self.client is not None:
            self.client.close()

    def _reconnect(self) -> None:
        owner = self.owner
        try:
            self.client.close()
        except Exception as err:  # noqa: BLE001 - the old connection is broken anyway
            log.debug("closing a broken connection: %s", err)
        self.client = owner._new_client()
        if self.region is not None:
            shared_memory.register(
                self.client, self.region, owner.protocol, owner._admin_key, owner.address, again=True
            )
        self.stale = False

    def _answer_each(self, batch: np.ndarray, k: int | None):
        """The batch's answer; if the server fails a batch of encoded images, each image's own answer or error."""
        try:
            return self._answer(batch, k)
        except InferenceError as err:
            if len(batch) == 1 or self.owner.input.kind != "image":
                raise
            log.info("%s; sending the batch's %d images one by one to find the one at fault", err, len(batch))
        rows: list = []
        for i in range(len(batch)):
            try:
                rows.append(self._answer(batch[i : i + 1], k)[0])
            except HrnetTritonError as err:
                rows.append(err)
        return rows

    def _answer(self, batch: np.ndarray, k: int | None):
        """One batch's answer; a lost server or an overload is retried with backoff within ``retry_s``."""
        owner, first, delay = self.owner, None, BACKOFF_S
        while True:
            try:
                if self.stale:
                    self._reconnect()
                result = owner._infer(self.client, self.region, batch, k)
            except (ServerUnavailableError, ServerOverloadedError) as err:
                now = time.monotonic()
                first = now if first is None else first
                lost = isinstance(err, ServerUnavailableError)
                since = owner._outage.begin(now) if lost else first
                pause, spent = min(delay, since + owner.retry_s - now), now - since
                if pause <= 0 or owner._closing.is_set():
                    raise _gave_up(err, spent, owner.retry_s) from err
                log.warning(
                    "%s; retrying in %.1f s (%.0f s of --retry-seconds %g spent)", err, pause, spent, owner.retry_s
                )
                self.stale = self.stale or lost
                if owner._closing.wait(pause):
                    raise _gave_up(err, time.monotonic() - since, owner.retry_s) from err
                delay = min(2 * delay, MAX_BACKOFF_S)
            else:
                owner._outage.end()
                return result
