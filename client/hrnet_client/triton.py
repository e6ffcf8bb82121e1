"""Classify through a Triton server over HTTP or gRPC, knowing only its URL and the model name.

The model's config on the server carries everything the client needs: ``max_batch_size``,
the input and output tensors, and the preprocessing contract in ``parameters``
(:meth:`hrnet_core.contract.PreprocessConfig.from_parameters`). Labels are the model's
``labels.txt``, which the server's classification extension reports, or PaddleClas's list.

Requests go out ``concurrency`` at a time. Each in-flight request runs on a "lane": a thread
that owns its own connection (tritonclient's HTTP client is gevent-based and must stay on the
thread that made it) and, with ``shared_memory=True``, its own pair of system shared-memory
regions registered with the server, so tensors do not travel through the socket (the server
must be on this host). Registering needs the server's admin key when its shared-memory API is
restricted (``admin_key``, default ``$HRNET_TRITON_ADMIN_KEY``).

A lane rides out a short outage: a batch whose request finds no server (refused, reset, closed
mid-answer, gRPC UNAVAILABLE) or an overloaded model is sent again with exponential backoff
(0.5 s doubling to 5 s, on a fresh connection, its shared memory registered again), until
``retry_s`` seconds after the outage began (all lanes share its start, so once the server has
been gone that long every batch fails at once). Each retry is logged; the final error says how
long it retried.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from hrnet_core.contract import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError

from .classify import Classifier
from .served_model import (
    BACKOFF_S,
    LIVE_RETRIES,
    InferenceError,
    Protocol,
    ServerOverloadedError,
    ServerUnavailableError,
    address,
    admin_headers,
    describe,
    is_restricted_refusal,
    is_transport_error,
    new_client,
    parse_classification,
    request_error,
)
from .served_model import admin_key as resolve_admin_key

log = logging.getLogger(__name__)

RETRY_S = 30.0  # how long a lost server or an overloaded model is retried (--retry-seconds)
MAX_BACKOFF_S = 5.0


@dataclass
class _SharedMemory:
    """One lane's input and output regions, registered with the server under ``name``-in/-out."""

    name: str
    input: Any
    output: Any
    input_bytes: int
    output_bytes: int


class _Outage:
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


class _Lane(threading.Thread):
    """A worker thread with its own client (and shared memory), taking jobs from a shared queue."""

    def __init__(self, owner: TritonClassifier, index: int, jobs: queue.SimpleQueue):
        super().__init__(name=f"triton-lane-{index}", daemon=True)
        self.owner, self.index, self.jobs = owner, index, jobs
        self.ready: Future[None] = Future()
        self.client: Any = None
        self.region: _SharedMemory | None = None
        self.stale = False  # the connection broke: reconnect (and register again) before the next request

    def run(self) -> None:
        owner = self.owner
        try:
            self.client = owner._new_client()
            if owner.shared_memory:
                self.region = owner._create_shared_memory(self.index)
                owner._register_shared_memory(self.client, self.region)
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
                        future.set_result(self._answer(batch, k))
                    except BaseException as err:
                        future.set_exception(err)
                del job, batch
        finally:
            self._release()

    def _release(self) -> None:
        if self.region is not None:
            self.owner._release_shared_memory(self.client, self.region)
        if self.client is not None:
            self.client.close()

    def _reconnect(self) -> None:
        try:
            self.client.close()
        except Exception as err:  # noqa: BLE001 - the old connection is broken anyway
            log.debug("closing a broken connection: %s", err)
        self.client = self.owner._new_client()
        if self.region is not None:
            self.owner._register_shared_memory(self.client, self.region, again=True)
        self.stale = False

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


class TritonClassifier(Classifier):
    """Classify through a Triton server: a :class:`~hrnet_core.runtime.Runner` and a :class:`Classifier`."""

    def __init__(
        self,
        url: str,
        model: str,
        protocol: Protocol = Protocol.HTTP,
        *,
        retries: int = LIVE_RETRIES,
        concurrency: int = 1,
        shared_memory: bool = False,
        server_top_k: bool = False,
        timeout_s: float = 60.0,
        retry_s: float = RETRY_S,
        admin_key: str | None = None,
    ):
        if concurrency < 1:
            raise HrnetTritonError(f"concurrency must be at least 1, got {concurrency}")
        if retry_s < 0:
            raise HrnetTritonError(f"retry_s (--retry-seconds) must be 0 or more, got {retry_s:g}")
        self.protocol = Protocol(protocol)
        self.model = model
        self.name = f"Triton {self.protocol.value.upper()}"
        self.address = address(url, self.protocol)
        self.concurrency = concurrency
        self.server_top_k = server_top_k
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.shared_memory = shared_memory
        self._admin_key = resolve_admin_key(admin_key)
        self._tc = self.protocol.module()
        self._outage = _Outage()
        self._closing = threading.Event()
        self.client = self._new_client()
        self._lanes: list[_Lane] = []
        try:
            self.served = describe(self.client, self.address, self.protocol, model, retries=retries)
            self.cfg, self.max_batch, self.labels = self.served.cfg, self.served.max_batch, self.served.labels
            self._jobs: queue.SimpleQueue = queue.SimpleQueue()
            for i in range(concurrency):
                self._lanes.append(_Lane(self, i, self._jobs))
                self._lanes[-1].start()
            for lane in self._lanes:
                lane.ready.result()
        except BaseException:
            self.close()
            raise

    def _new_client(self):
        return new_client(self.address, self.protocol, self.timeout_s)

    # -- shared memory ----------------------------------------------------------------------

    def _create_shared_memory(self, index: int) -> _SharedMemory:
        import tritonclient.utils.shared_memory as shm

        c = self.cfg.crop_size
        name = f"hrnet-{os.getpid()}-{uuid.uuid4().hex[:8]}-{index}"
        region = _SharedMemory(name, None, None, self.max_batch * 3 * c * c * 4, self.max_batch * NUM_CLASSES * 4)
        try:
            region.input = shm.create_shared_memory_region(f"{name}-in", f"/{name}-in", region.input_bytes, True)
            region.output = shm.create_shared_memory_region(f"{name}-out", f"/{name}-out", region.output_bytes, True)
        except shm.SharedMemoryException as err:
            self._release_shared_memory(None, region)
            raise HrnetTritonError(f"cannot create shared memory for the client ({err}); is /dev/shm full?") from err
        return region

    def _register_shared_memory(self, client, region: _SharedMemory, *, again: bool = False) -> None:
        """Register the lane's regions with the server (``again`` after reconnecting: unregister first)."""
        headers = admin_headers(self.protocol, self._admin_key)
        try:
            for suffix, size in (("in", region.input_bytes), ("out", region.output_bytes)):
                if again:
                    self._unregister(client, f"{region.name}-{suffix}")
                client.register_system_shared_memory(
                    f"{region.name}-{suffix}", f"/{region.name}-{suffix}", size, headers=headers
                )
        except Exception as err:
            raise self._registration_error(err) from err

    def _registration_error(self, err: Exception) -> HrnetTritonError:
        if is_transport_error(err):
            return ServerUnavailableError(f"lost the server at {self.address} registering shared memory ({err})")
        message = err.message() if hasattr(err, "message") else str(err)
        if is_restricted_refusal(err):
            held = "a key it refused" if self._admin_key else "no key"
            return HrnetTritonError(
                f"the server at {self.address} restricts shared-memory registration to its admin key, and this "
                f"client sent {held} ({message}). Set HRNET_TRITON_ADMIN_KEY (or --admin-key) to the server's "
                "key, or drop --shared-memory"
            )
        return HrnetTritonError(
            f"the server at {self.address} cannot map this client's shared memory ({message}); "
            "--shared-memory needs the server on this host, sharing its /dev/shm. Drop the flag otherwise"
        )

    def _unregister(self, client, name: str) -> None:
        try:
            client.unregister_system_shared_memory(name, headers=admin_headers(self.protocol, self._admin_key))
        except Exception as err:  # noqa: BLE001 - best effort: a restarted server has no such region
            log.debug("unregistering %s: %s", name, err)

    def _release_shared_memory(self, client, region: _SharedMemory) -> None:
        import tritonclient.utils.shared_memory as shm

        for suffix, handle in (("in", region.input), ("out", region.output)):
            if client is not None:
                self._unregister(client, f"{region.name}-{suffix}")
            if handle is not None:
                shm.destroy_shared_memory_region(handle)

    def close(self) -> None:
        """Stop the lanes (each unregisters and frees its shared memory). Safe to call twice."""
        self._closing.set()  # a lane waiting to retry gives up at once
        lanes, self._lanes = self._lanes, []
        for _ in lanes:
            self._jobs.put(None)
        for lane in lanes:
            lane.join()
        self.client.close()

    # -- inference --------------------------------------------------------------------------

    def _infer(self, client, region: _SharedMemory | None, batch: np.ndarray, k: int | None):
        """One request of at most ``max_batch`` images. Returns probabilities, or with ``k`` the
        server's top-k (classification extension)."""
        import tritonclient.utils.shared_memory as shm

        tc = self._tc
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        inp = tc.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        out = tc.InferRequestedOutput(OUTPUT_NAME, class_count=k or 0)
        if region is not None:
            shm.set_shared_memory_region(region.input, [batch])
            inp.set_shared_memory(f"{region.name}-in", batch.nbytes)
            if not k:  # a classification answer is strings, of no fixed size: it comes back inline
                out.set_shared_memory(f"{region.name}-out", len(batch) * NUM_CLASSES * 4)
        else:
            inp.set_data_from_numpy(batch)
        options = {"client_timeout": self.timeout_s} if self.protocol is Protocol.GRPC else {}
        try:
            result = client.infer(self.model, [inp], outputs=[out], **options)
        except Exception as err:  # every failure of the call becomes this batch's error
            raise request_error(err, self.model, self.address, len(batch)) from err
        if k:
            return parse_classification(result.as_numpy(OUTPUT_NAME))
        if region is not None:
            probs = shm.get_contents_as_numpy(region.output, np.float32, [len(batch), NUM_CLASSES]).copy()
        else:
            probs = result.as_numpy(OUTPUT_NAME)
        if probs is None or probs.shape != (len(batch), NUM_CLASSES):
            got = None if probs is None else probs.shape
            raise InferenceError(f"{self.model} answered {got}, expected ({len(batch)}, {NUM_CLASSES})")
        return probs

    def _submit(self, batch: np.ndarray, k: int | None) -> Future:
        """Queue one batch for the lanes; with ``k`` and ``server_top_k`` the server ranks it."""
        if not self._lanes:
            raise HrnetTritonError("this classifier was closed; make a new one")
        future: Future = Future()
        self._jobs.put((batch, k if self.server_top_k else None, future))
        return future

    def _check_batch(self, batch: np.ndarray) -> None:
        c = self.cfg.crop_size
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1:] != (3, c, c) or len(batch) == 0:
            got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise InferenceError(
                f"{self.model} takes a float32 batch of shape (N>=1, 3, {c}, {c}), got {got}; "
                "make one with hrnet_core.preprocess.load_tensors"
            )
        if batch.dtype != np.float32:
            raise InferenceError(
                f"{self.model} takes float32 tensors, got {batch.dtype}; convert with batch.astype(np.float32)"
            )
        finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise InferenceError(
                f"{len(bad)} of the {len(batch)} images in the batch hold NaN or infinite values (the first at "
                f"index {bad[0]}); nothing was sent, since the model's answer to them would be meaningless. "
                "Pass finite tensors, as hrnet_core.preprocess makes"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a float32 NCHW batch of any length (sent in ``max_batch`` pieces)."""
        self._check_batch(batch)
        return np.concatenate(
            self._gather([batch[s : s + self.max_batch] for s in range(0, len(batch), self.max_batch)])
        )

    def run_batches(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for each batch, each sent as one request (of at most ``max_batch``
        images), ``concurrency`` at a time; the first failure is raised."""
        for batch in batches:
            self._check_batch(batch)
            if len(batch) > self.max_batch:
                raise InferenceError(f"a batch of {len(batch)} is above {self.model}'s max_batch_size {self.max_batch}")
        return self._gather(batches)

    def _gather(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        futures = [self._submit(batch, None) for batch in batches]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:  # after a failure: do not send the rest
                future.cancel()
