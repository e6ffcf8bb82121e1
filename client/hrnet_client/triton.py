"""Classify through a Triton server over HTTP or gRPC, knowing only its URL and the model name.

The model's config on the server carries everything the client needs: ``max_batch_size``,
the input and output tensors, and the preprocessing contract in ``parameters``
(:meth:`hrnet_triton.contract.PreprocessConfig.from_parameters`). Labels are the model's
``labels.txt`` as the server's classification extension reports them, or PaddleClas's list.
"""

from __future__ import annotations

import enum
import logging
import time
from urllib.parse import urlsplit

import numpy as np

from hrnet_triton.contract import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME, PreprocessConfig, imagenet_labels
from hrnet_triton.errors import HrnetTritonError

from .classify import Classifier

log = logging.getLogger(__name__)

RETRIES = 4
BACKOFF_S = 0.5


class Protocol(str, enum.Enum):
    HTTP = "http"
    GRPC = "grpc"


class ServerUnavailableError(HrnetTritonError):
    """No Triton server answered at the address."""


class UnknownModelError(HrnetTritonError):
    """The server does not serve the model asked for."""


def host_port(url: str, protocol: Protocol) -> str:
    """``http://host:8000`` or ``host:8001`` -> ``host:port`` (default ports 8000/8001)."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    if not parts.hostname:
        raise HrnetTritonError(f"--url {url!r}: expected host[:port], e.g. localhost:8000")
    port = parts.port or (8000 if protocol is Protocol.HTTP else 8001)
    return f"{parts.hostname}:{port}"


class TritonClassifier(Classifier):
    def __init__(self, url: str, model: str, protocol: Protocol = Protocol.HTTP, *, retries: int = RETRIES):
        self.protocol = Protocol(protocol)
        self.model = model
        self.address = host_port(url, self.protocol)
        if self.protocol is Protocol.HTTP:
            import tritonclient.http as tc
        else:
            import tritonclient.grpc as tc
        self._tc = tc
        self.client = tc.InferenceServerClient(self.address)
        self._wait_live(retries)
        config = self._model_config()
        self.max_batch = int(config.get("max_batch_size", 1)) or 1
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        try:
            self.cfg = PreprocessConfig.from_parameters(params)
        except ValueError as err:
            raise HrnetTritonError(f"model {model!r} on {self.address} does not carry the HRNet contract: {err}") from err
        self.labels = imagenet_labels()

    def _wait_live(self, retries: int) -> None:
        from tritonclient.utils import InferenceServerException

        delay = BACKOFF_S
        for attempt in range(retries + 1):
            try:
                if self.client.is_server_live():
                    return
            except (InferenceServerException, OSError, ConnectionError) as err:
                last = err
            else:
                last = "not live"
            if attempt < retries:
                log.info("no answer from %s (%s); retrying in %.1f s", self.address, last, delay)
                time.sleep(delay)
                delay *= 2
        raise ServerUnavailableError(
            f"no Triton server answers at {self.address} over {self.protocol.value} after {retries + 1} tries "
            f"({last}). Start one with `hrnet-triton serve`, or check --url and --protocol"
        )

    def _model_config(self) -> dict:
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol is Protocol.HTTP:
                return self.client.get_model_config(self.model)
            return self.client.get_model_config(self.model, as_json=True)["config"]
        except InferenceServerException as err:
            try:
                if self.protocol is Protocol.HTTP:
                    index = self.client.get_model_repository_index()
                else:
                    index = self.client.get_model_repository_index(as_json=True).get("models", [])
                names = sorted({m["name"] for m in index})
            except InferenceServerException:
                names = []
            raise UnknownModelError(
                f"the server at {self.address} has no model {self.model!r} ({err.message()}); it serves: "
                f"{', '.join(names) or 'nothing'}"
            ) from err

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        out = []
        for start in range(0, len(batch), self.max_batch):
            chunk = np.ascontiguousarray(batch[start : start + self.max_batch], dtype=np.float32)
            inp = self._tc.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
            inp.set_data_from_numpy(chunk)
            try:
                result = self.client.infer(self.model, [inp], outputs=[self._tc.InferRequestedOutput(OUTPUT_NAME)])
            except InferenceServerException as err:
                raise HrnetTritonError(f"{self.model} on {self.address} rejected the request: {err.message()}") from err
            probs = result.as_numpy(OUTPUT_NAME)
            if probs is None or probs.shape != (len(chunk), NUM_CLASSES):
                got = None if probs is None else probs.shape
                raise HrnetTritonError(f"{self.model} answered {got}, expected ({len(chunk)}, {NUM_CLASSES})")
            out.append(probs)
        return np.concatenate(out)
