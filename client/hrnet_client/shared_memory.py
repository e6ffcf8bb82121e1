"""One lane's pair of system shared-memory regions: the batch in, the probabilities out.

With ``--shared-memory`` each in-flight request owns an input and an output region in
``/dev/shm``, registered with the server, so tensors do not travel through the socket (the
server must be on this host). Registering is one of Triton's admin APIs: it takes the server's
admin key when that API is restricted. Only fixed-size inputs (the tensor and uint8 kinds) use
it; an encoded file is sent in the request.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

from hrnet_core.errors import HrnetTritonError

from .served_model import Protocol, ServerUnavailableError, admin_headers, is_restricted_refusal, is_transport_error

log = logging.getLogger(__name__)


@dataclass
class Regions:
    """One lane's input and output regions, registered with the server under ``name``-in/-out."""

    name: str
    input: Any
    output: Any
    input_bytes: int
    output_bytes: int


def create(index: int, input_bytes: int, output_bytes: int) -> Regions:
    import tritonclient.utils.shared_memory as shm

    name = f"hrnet-{os.getpid()}-{uuid.uuid4().hex[:8]}-{index}"
    regions = Regions(name, None, None, input_bytes, output_bytes)
    try:
        regions.input = shm.create_shared_memory_region(f"{name}-in", f"/{name}-in", input_bytes, True)
        regions.output = shm.create_shared_memory_region(f"{name}-out", f"/{name}-out", output_bytes, True)
    except shm.SharedMemoryException as err:
        release(None, regions, Protocol.HTTP, None)
        raise HrnetTritonError(f"cannot create shared memory for the client ({err}); is /dev/shm full?") from err
    return regions


def register(
    client: Any, regions: Regions, protocol: Protocol, key: str | None, addr: str, *, again: bool = False
) -> None:
    """Register the regions with the server (``again`` after reconnecting: unregister first)."""
    headers = admin_headers(protocol, key)
    try:
        for suffix, size in (("in", regions.input_bytes), ("out", regions.output_bytes)):
            if again:
                unregister(client, f"{regions.name}-{suffix}", protocol, key)
            client.register_system_shared_memory(
                f"{regions.name}-{suffix}", f"/{regions.name}-{suffix}", size, headers=headers
            )
    except Exception as err:
        raise _registration_error(err, addr, key) from err


def _registration_error(err: Exception, addr: str, key: str | None) -> HrnetTritonError:
    if is_transport_error(err):
        return ServerUnavailableError(f"lost the server at {addr} registering shared memory ({err})")
    message = err.message() if hasattr(err, "message") else str(err)
    if is_restricted_refusal(err):
        held = "a key it refused" if key else "no key"
        return HrnetTritonError(
            f"the server at {addr} restricts shared-memory registration to its admin key, and this "
            f"client sent {held} ({message}). Set HRNET_TRITON_ADMIN_KEY (or --admin-key) to the server's "
            "key, or drop --shared-memory"
        )
    return HrnetTritonError(
        f"the server at {addr} cannot map this client's shared memory ({message}); "
        "--shared-memory needs the server on this host, sharing its /dev/shm. Drop the flag otherwise"
    )


def unregister(client: Any, name: str, protocol: Protocol, key: str | None) -> None:
    try:
        client.unregister_system_shared_memory(name, headers=admin_headers(protocol, key))
    except Exception as err:  # noqa: BLE001 - best effort: a restarted server has no such region
        log.debug("unregistering %s: %s", name, err)


def release(client: Any, regions: Regions, protocol: Protocol, key: str | None) -> None:
    """Unregister the regions (with a ``client``) and free them."""
    import tritonclient.utils.shared_memory as shm

    for suffix, handle in (("in", regions.input), ("out", regions.output)):
        if client is not None:
            unregister(client, f"{regions.name}-{suffix}", protocol, key)
        if handle is not None:
            shm.destroy_shared_memory_region(handle)
