"""Classify through a Triton server over HTTP or gRPC, knowing only its URL and the model name.

The model's config on the server carries everything the client needs: ``max_batch_size``,
the input and output tensors, and the preprocessing contract in ``parameters``
(:meth:`hrnet_core.contract.PreprocessConfig.from_parameters`). Labels are the model's
``labels.txt``, which the server's classification extension reports, or PaddleClas's list.

Requests go out ``concurrency`` at a time. Each in-flight request runs on a "lane": a thread
that owns its own connection (tritonclient's HTTP client is gevent-based and must stay on the
thread that made it) and, with ``shared_memory=True``, its own pair of system shared-memory
regions registered with the server, so tensors do not travel through the socket (the server
must be on this host).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from hrnet_core.contract import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError
from hrnet_core.labels import Guess

from .classify import Classifier
from .served_model import (
    LIVE_RETRIES,
    Protocol,
    ServerUnavailableError,
    address,
    describe,
    new_client,
    parse_classification,
)

log = logging.getLogger(__name__)


class ServerOverloadedError(HrnetTritonError):
    """The server refused a request because the model's queue was full or the request waited
    longer than the queue policy allows (the config's ``default_queue_policy``)."""


class InferenceError(HrnetTritonError):
    """The server failed a request for another reason, or answered in the wrong form."""


# Triton's words for the two queue-policy rejections (dynamic batcher, REJECT action).
_OVERLOAD_MARKERS = ("exceeds maximum queue size", "request timeout expired")


@dataclass
class _SharedMemory:
    """One lane's input and output regions, registered with the server under ``name``-in/-out."""

    name: str
    input: Any
    output: Any
    input_bytes: int
    output_bytes: int


class _Lane(threading.Thread):
    """A worker thread with its own client (and shared memory), taking jobs from a shared queue."""

    def __init__(self, owner: TritonClassifier, index: int, jobs: queue.SimpleQueue):
        super().__init__(name=f"triton-lane-{index}", daemon=True)
        self.owner, self.index, self.jobs = owner, index, jobs
        self.ready: Future[None] = Future()

    def run(self) -> None:
        owner, client, region = self.owner, None, None
        try:
            client = owner._new_client()
            if owner.shared_memory:
                region = owner._register_shared_memory(client, self.index)
        except Exception as err:  # reported to the constructor through `ready`
            if client is not None:
                client.close()
            self.ready.set_exception(err)
            return
        self.ready.set_result(None)
        try:
            while (job := self.jobs.get()) is not None:
                batch, k, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(owner._infer(client, region, batch, k))
                    except BaseException as err:
                        future.set_exception(err)
        finally:
            if region is not None:
                owner._release_shared_memory(client, region)
            client.close()


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
    ):
        if concurrency < 1:
            raise HrnetTritonError(f"concurrency must be at least 1, got {concurrency}")
        self.protocol = Protocol(protocol)
        self.model = model
        self.name = f"Triton {self.protocol.value.upper()}"
        self.address = address(url, self.protocol)
        self.concurrency = concurrency
        self.server_top_k = server_top_k
        self.timeout_s = timeout_s
        self.shared_memory = shared_memory
        self._tc = self.protocol.module()
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

    def _register_shared_memory(self, client, index: int) -> _SharedMemory:
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        c = self.cfg.crop_size
        name = f"hrnet-{os.getpid()}-{uuid.uuid4().hex[:8]}-{index}"
        in_bytes = self.max_batch * 3 * c * c * 4
        out_bytes = self.max_batch * NUM_CLASSES * 4
        region = _SharedMemory(name, None, None, in_bytes, out_bytes)
        try:
            region.input = shm.create_shared_memory_region(f"{name}-in", f"/{name}-in", in_bytes, create_only=True)
            region.output = shm.create_shared_memory_region(f"{name}-out", f"/{name}-out", out_bytes, create_only=True)
            client.register_system_shared_memory(f"{name}-in", f"/{name}-in", in_bytes)
            client.register_system_shared_memory(f"{name}-out", f"/{name}-out", out_bytes)
        except InferenceServerException as err:
            self._release_shared_memory(client, region)
            raise HrnetTritonError(
                f"the server at {self.address} cannot map this client's shared memory ({err.message()}); "
                "--shared-memory needs the server on this host, sharing its /dev/shm. Drop the flag otherwise"
            ) from err
        except shm.SharedMemoryException as err:
            self._release_shared_memory(client, region)
            raise HrnetTritonError(f"cannot create shared memory for the client ({err}); is /dev/shm full?") from err
        return region

    @staticmethod
    def _release_shared_memory(client, region: _SharedMemory) -> None:
        import tritonclient.utils.shared_memory as shm

        for suffix, handle in (("in", region.input), ("out", region.output)):
            try:
                client.unregister_system_shared_memory(f"{region.name}-{suffix}")
            except Exception as err:  # noqa: BLE001 - best effort while cleaning up
                log.debug("unregistering %s-%s: %s", region.name, suffix, err)
            if handle is not None:
                shm.destroy_shared_memory_region(handle)

    def close(self) -> None:
        """Stop the lanes (each unregisters and frees its shared memory). Safe to call twice."""
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
        from tritonclient.utils import InferenceServerException

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
        try:
            result = client.infer(self.model, [inp], outputs=[out])
        except OSError as err:  # the HTTP client's connection errors (gRPC's are InferenceServerException)
            raise ServerUnavailableError(f"lost the server at {self.address} during a request ({err})") from err
        except InferenceServerException as err:
            message = err.message() or str(err)
            if any(m in message.lower() for m in _OVERLOAD_MARKERS):
                raise ServerOverloadedError(
                    f"{self.model} on {self.address} is overloaded and rejected a batch of {len(batch)} ({message}); "
                    "retry later, send fewer requests at once (--concurrency), or raise the model's queue size"
                ) from err
            raise InferenceError(f"{self.model} on {self.address} failed a request: {message}") from err
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

    def _map(self, batches: Sequence[np.ndarray], k: int | None) -> Iterator[Any]:
        """Results (or the error) per batch, in order, with up to ``concurrency`` in flight."""
        if not self._lanes:
            raise HrnetTritonError("this classifier was closed; make a new one")
        futures: list[Future] = []
        for batch in batches:
            futures.append(Future())
            self._jobs.put((batch, k, futures[-1]))
        try:
            for future in futures:
                try:
                    yield future.result()
                except HrnetTritonError as err:
                    yield err
        finally:
            for future in futures:  # a consumer that stopped early: do not send the rest
                future.cancel()

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

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a float32 NCHW batch of any length (sent in ``max_batch`` pieces)."""
        self._check_batch(batch)
        return np.concatenate(
            self.run_batches([batch[s : s + self.max_batch] for s in range(0, len(batch), self.max_batch)])
        )

    def run_batches(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for each batch, each sent as one request (of at most ``max_batch``
        images), ``concurrency`` at a time; the first failure is raised."""
        for batch in batches:
            self._check_batch(batch)
            if len(batch) > self.max_batch:
                raise InferenceError(f"a batch of {len(batch)} is above {self.model}'s max_batch_size {self.max_batch}")
        out = []
        for result in self._map(batches, None):
            if isinstance(result, Exception):
                raise result
            out.append(result)
        return out

    def classify_batches(
        self, batches: Sequence[np.ndarray], k: int
    ) -> Iterator[list[tuple[Guess, ...]] | HrnetTritonError]:
        if not self.server_top_k:
            yield from super().classify_batches(batches, k)
            return
        yield from self._map(batches, k)

    def _probabilities_per_batch(self, batches: Sequence[np.ndarray]) -> Iterator[np.ndarray | HrnetTritonError]:
        return self._map(batches, None)
