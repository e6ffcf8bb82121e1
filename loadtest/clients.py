"""tritonclients inside Locust: each closed exactly once, and every request reported to Locust.

A gRPC client left open, or closed twice (its ``__del__`` closes again), hangs the process at exit:
docs/loadtest.md, "Why every client is closed once". So every client is made by ``open_client`` and
closed by ``close_client``, and whatever no user closed is closed at ``test_stop`` and ``quitting``,
while gevent's hub still runs.
"""

from __future__ import annotations

import logging
import time

import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import events

from hrnet_client.served_model import Protocol, new_client
from hrnet_core.contract import OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError

from .checks import check_classification, check_probabilities

grpc_gevent.init_gevent()  # gRPC's own threads would block Locust's event loop otherwise

log = logging.getLogger("hrnet.loadtest")

_open_clients: set = set()


class RequestFailed(HrnetTritonError):
    """A request the server failed, with the server's words: what Locust records and reports."""


def open_client(addr: str, protocol: Protocol):
    """A new tritonclient for ``addr``, registered so that it is closed exactly once."""
    client = new_client(addr, protocol)
    _open_clients.add(client)
    return client


def close_client(client) -> None:
    """Close ``client`` if it is still open; afterwards its ``close`` (and so its ``__del__``) does nothing."""
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


def reported(err: Exception) -> Exception:
    """What Locust records for a failed request: tritonclient's InferenceServerException has no args,
    so its repr (Locust's error text) would be a bare "InferenceServerException()"."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(err, InferenceServerException):
        return err
    message = str(err) or "the server failed the request and gave no reason"
    if any(m in message.lower() for m in ("exceeds maximum queue size", "request timeout expired")):
        message += "; the model's queue is full: fewer users (-u), or a larger queue (repo --max-queue-size)"
    return RequestFailed(message)


class TritonLocustClient:
    """A tritonclient that reports every request to Locust, with its answer checked.

    ``work`` is the user's ``Workload`` (hrnet_loadtest.workload): the served model, its input and address."""

    def __init__(self, environment, work, top_k: int):
        self.environment, self.model, self.k = environment, work.model.name, top_k  # the served model chosen
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
            error = reported(err)
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
