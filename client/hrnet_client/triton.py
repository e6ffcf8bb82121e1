"""Classify through a Triton server over HTTP or gRPC, knowing only its URL and the model name.

The model's config on the server carries everything the client needs: ``max_batch_size``,
the input and output tensors, and the preprocessing contract in ``parameters``
(:meth:`hrnet_core.contract.PreprocessConfig.from_parameters`). Labels are the model's
``labels.txt``, which the server's classification extension reports, or PaddleClas's list.

What is sent is the input the served model takes (:mod:`hrnet_client.inputs`): preprocessed
tensors, uint8 crops, or the files' bytes. Without ``input``, the client takes what the server
offers best for the variant: ``<model>_image``, else ``<model>_uint8``, else ``<model>``
(:func:`hrnet_client.served_model.choose`).

Requests go out ``concurrency`` at a time, each on a lane (:mod:`hrnet_client.lane`): a thread
with its own connection and, with ``shared_memory=True``, its own pair of shared-memory regions
(:mod:`hrnet_client.shared_memory`; tensor and uint8 inputs only), registered with the server
with its admin key (``admin_key``, default ``$HRNET_TRITON_ADMIN_KEY``). A lane rides out a
short outage or an overload, retrying with backoff for up to ``retry_s`` seconds.

With ``grpc_round_robin=True`` (gRPC), each lane's channel sends its requests in turn to every
server its target resolves to: ``dns:///triton-grpc.hrnet-triton:8001`` (the headless Service of
k8s/components/grpc-round-robin) or ``ipv4:10.0.0.1:8001,10.0.0.2:8001`` (docs/client.md).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from hrnet_core.contract import MAX_PIXELS, NUM_CLASSES, OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError

from .classify import Classifier
from .lane import Lane, Outage
from .served_model import (
    LIVE_RETRIES,
    InferenceError,
    Protocol,
    ServerOverloadedError,
    ServerUnavailableError,
    address,
    choose,
    new_client,
    parse_classification,
    request_error,
)
from .served_model import admin_key as resolve_admin_key
from .shared_memory import Regions

__all__ = ["InferenceError", "ServerOverloadedError", "ServerUnavailableError", "TritonClassifier"]

log = logging.getLogger(__name__)

RETRY_S = 30.0  # how long a lost server or an overloaded model is retried (--retry-seconds)


class TritonClassifier(Classifier):
    """Classify through a Triton server: a :class:`~hrnet_core.runtime.Runner` and a :class:`Classifier`.

    ``model`` names the variant (``HRNet_W18_C``) or one of its served models
    (``HRNet_W18_C_image``); ``input`` (tensor, uint8 or image) picks the input, by default the
    best the server offers. ``self.model`` is the served model chosen, ``self.input`` its input.
    """

    def __init__(
        self,
        url: str,
        model: str,
        protocol: Protocol = Protocol.HTTP,
        *,
        input: str | None = None,
        retries: int = LIVE_RETRIES,
        concurrency: int = 1,
        shared_memory: bool = False,
        server_top_k: bool = False,
        timeout_s: float = 60.0,
        retry_s: float = RETRY_S,
        admin_key: str | None = None,
        grpc_round_robin: bool = False,
    ):
        if concurrency < 1:
            raise HrnetTritonError(f"concurrency must be at least 1, got {concurrency}")
        if retry_s < 0:
            raise HrnetTritonError(f"retry_s (--retry-seconds) must be 0 or more, got {retry_s:g}")
        self.protocol = Protocol(protocol)
        self.address = address(url, self.protocol)
        self.name = f"Triton {self.protocol.value.upper()}"
        self.concurrency, self.server_top_k, self.timeout_s = concurrency, server_top_k, timeout_s
        self.retry_s, self.shared_memory = retry_s, shared_memory
        if grpc_round_robin and shared_memory:
            raise HrnetTritonError(
                "--shared-memory is registered with one server; it cannot go with --grpc-round-robin"
            )
        self.round_robin = grpc_round_robin
        self._admin_key = resolve_admin_key(admin_key)
        self._tc = self.protocol.module()
        self._outage = Outage()
        self._closing = threading.Event()
        self.client = self._new_client()
        self._lanes: list[Lane] = []
        try:
            self.served = choose(
                self.client, self.address, self.protocol, model, input, shared_memory=shared_memory, retries=retries
            )
            self.model, self.input = self.served.name, self.served.input
            self.cfg, self.max_batch, self.labels = self.served.cfg, self.served.max_batch, self.served.labels
            if shared_memory and not self.input.shared_memory:
                raise HrnetTritonError(
                    f"{self.model} takes the files' bytes, which go in the request, not through shared memory; "
                    "drop --shared-memory, or choose --input uint8 or tensor"
                )
            self._jobs: queue.SimpleQueue = queue.SimpleQueue()
            self._lanes = [Lane(self, i, self._jobs) for i in range(concurrency)]
            for lane in self._lanes:
                lane.start()
            for lane in self._lanes:
                lane.ready.result()
        except BaseException:
            self.close()
            raise

    def _new_client(self):
        return new_client(self.address, self.protocol, self.timeout_s, round_robin=self.round_robin)

    def _loader(self, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None):
        return self.input.loader(self.cfg, max_pixels, max_bytes)

    def close(self) -> None:
        """Stop the lanes (each unregisters and frees its shared memory). Safe to call twice."""
        self._closing.set()  # a lane waiting to retry gives up at once
        lanes, self._lanes = self._lanes, []
        for _ in lanes:
            self._jobs.put(None)
        for lane in lanes:
            if lane.ident is not None:  # started
                lane.join()
        self.client.close()

    # -- inference --------------------------------------------------------------------------

    def _infer(self, client, region: Regions | None, batch: np.ndarray, k: int | None):
        """One request of at most ``max_batch`` images. Returns probabilities, or with ``k`` the
        server's top-k (classification extension)."""
        import tritonclient.utils.shared_memory as shm

        tc = self._tc
        if batch.dtype != np.object_:
            batch = np.ascontiguousarray(batch, dtype=self.input.dtype)
        out = tc.InferRequestedOutput(OUTPUT_NAME, class_count=k or 0)
        if region is not None:
            inp = tc.InferInput(self.input.name, list(batch.shape), self.input.datatype)
            shm.set_shared_memory_region(region.input, [batch])
            inp.set_shared_memory(f"{region.name}-in", batch.nbytes)
            if not k:  # a classification answer is strings, of no fixed size: it comes back inline
                out.set_shared_memory(f"{region.name}-out", len(batch) * NUM_CLASSES * 4)
        else:
            inp = self.input.request(tc, batch)
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
        spec, model = self.input, self.model
        if not isinstance(batch, np.ndarray) or batch.shape[1:] != spec.dims or len(batch) == 0:
            got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
            make = {"tensor": "hrnet_core.preprocess.load_tensors", "uint8": "hrnet_core.preprocess.load_crop"}
            raise InferenceError(
                f"{model} takes a {spec.datatype} batch of shape (N>=1, {', '.join(map(str, spec.dims))}), got {got}; "
                f"make one with {make.get(spec.kind, 'hrnet_client.inputs.encoded')}"
            )
        if batch.dtype != spec.dtype:
            what = {"tensor": "float32 tensors", "uint8": "uint8 crops"}.get(spec.kind, "an object array of bytes")
            raise InferenceError(f"{model} takes {what}, got {batch.dtype}; convert with batch.astype(np.{spec.dtype})")
        if spec.kind != "tensor":
            return
        finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise InferenceError(
                f"{len(bad)} of the {len(batch)} images in the batch hold NaN or infinite values (the first at "
                f"index {bad[0]}); nothing was sent, since the model's answer to them would be meaningless. "
                "Pass finite tensors, as hrnet_core.preprocess makes"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of any length in the model's input (float32 NCHW tensors, uint8 NHWC
        crops, or encoded files of shape ``(N, 1)``), sent in ``max_batch`` pieces."""
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
