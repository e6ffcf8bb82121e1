"""A model on a Triton server, as a client sees it: the one place that talks to Triton before inference.

:func:`describe` turns a server address and a model name into a :class:`ServedModel`: the
address for the chosen protocol, the preprocessing contract and ``max_batch_size`` read from
the model's config, and its labels. Both the client (:mod:`hrnet_client.triton`) and the Locust
load test use it, so both parse addresses, check the server, and report an unknown model the
same way.
"""

from __future__ import annotations

import enum
import http.client
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from hrnet_core.contract import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    DEFAULT_PREPROCESS,
    INPUT_KINDS,
    MODEL_SUFFIX,
    OUTPUT_NAME,
    PreprocessConfig,
    model_name,
)
from hrnet_core.errors import HrnetTritonError
from hrnet_core.labels import Guess, Labels, imagenet_labels

from .inputs import InputError, ModelInput, input_of

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
LIVE_RETRIES = 4
BACKOFF_S = 0.5


class Protocol(str, enum.Enum):
    HTTP = "http"
    GRPC = "grpc"

    def module(self):
        """``tritonclient.http`` or ``tritonclient.grpc``."""
        if self is Protocol.HTTP:
            import tritonclient.http as tc
        else:
            import tritonclient.grpc as tc
        return tc


class ServerUnavailableError(HrnetTritonError):
    """No Triton server answered at the address."""


class UnknownModelError(HrnetTritonError):
    """The server does not serve the model asked for, or not as an HRNet classifier."""


class ServerOverloadedError(HrnetTritonError):
    """The server refused a request because the model's queue was full or the request waited
    longer than the queue policy allows (the config's ``default_queue_policy``)."""


class InferenceError(HrnetTritonError):
    """The server failed a request for another reason, or answered in the wrong form."""


# Triton's words for the two queue-policy rejections (dynamic batcher, REJECT action).
_OVERLOAD_MARKERS = ("exceeds maximum queue size", "request timeout expired")


# gRPC target names that resolve to several servers (gRPC's naming doc): dns:///host:port (every
# address of a headless Service), ipv4:a:port,b:port, ipv6:[a]:port,[b]:port.
GRPC_RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def address(url: str, protocol: Protocol | str, grpc_port: int | None = None) -> str:
    """``host:port`` for ``protocol`` from ``url``: ``http://host:8000``, ``host:8001`` or ``grpc://host:8001``.
    A gRPC target name (``dns:``, ``ipv4:``, ``ipv6:``) is returned as it is.

    Without a port the protocol's default is used (8000/8001). ``grpc_port`` takes the gRPC port
    when ``url`` is the server's HTTP address (as Locust's ``--host`` is), unless the URL's scheme
    is ``grpc://``.
    """
    protocol = Protocol(protocol)
    if protocol is Protocol.GRPC and url.startswith(GRPC_RESOLVER_SCHEMES):
        # a gRPC target name, e.g. dns:///triton-grpc.hrnet-triton:8001, for the channel as written;
        # gRPC would send a dns: name without a port to 443, so Triton's 8001 is added
        name = url.rsplit("/", 1)[-1]
        if url.startswith("dns:") and ":" not in name.rsplit("]", 1)[-1]:
            return f"{url}:{DEFAULT_PORTS[protocol.value]}"
        return url
    parts = urlsplit(url if "//" in url else f"//{url}")
    try:
        port = parts.port
    except ValueError as err:
        raise HrnetTritonError(f"{url!r}: {err}; expected host[:port], e.g. localhost:8000") from None
    if not parts.hostname:
        raise HrnetTritonError(f"{url!r}: expected host[:port], e.g. localhost:8000")
    if protocol is Protocol.GRPC and grpc_port is not None and parts.scheme != "grpc":
        port = grpc_port
    return f"{parts.hostname}:{port or DEFAULT_PORTS[protocol.value]}"


@dataclass(frozen=True)
class ServedModel:
    """What a client needs to know of a model on a server, read from the server itself."""

    name: str
    address: str
    protocol: Protocol
    cfg: PreprocessConfig
    max_batch: int
    labels: Labels = field(repr=False)
    config: dict = field(repr=False)
    input: ModelInput = ModelInput("tensor", "x", "FP32", (3, 224, 224))


def new_client(addr: str, protocol: Protocol, timeout_s: float = 60.0, round_robin: bool = False):
    """A tritonclient for ``addr``; HTTP clients must stay on the thread that made them.

    ``round_robin`` (gRPC only) sends each request to the next of the servers ``addr`` resolves to
    (gRPC's client-side ``round_robin`` policy), not all to the first: with a headless Service's
    ``dns:///`` name, requests spread over the pods. tritonclient's own channel options are kept.
    """
    tc = protocol.module()
    if protocol is Protocol.HTTP:
        if round_robin:
            raise HrnetTritonError("round-robin balancing is gRPC's (--protocol grpc); HTTP balances per connection")
        return tc.InferenceServerClient(addr, connection_timeout=timeout_s, network_timeout=timeout_s)
    if not round_robin:
        return tc.InferenceServerClient(addr)
    keepalive = tc.KeepAliveOptions()
    return tc.InferenceServerClient(
        addr,
        channel_args=[
            ("grpc.max_send_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.lb_policy_name", "round_robin"),
        ],
    )


def admin_key(key: str | None = None) -> str | None:
    """The key for the server's restricted (admin) APIs: ``key``, else ``$HRNET_TRITON_ADMIN_KEY``, else none."""
    return key if key is not None else (os.environ.get(ADMIN_KEY_ENV) or None)


def admin_headers(protocol: Protocol, key: str | None) -> dict[str, str] | None:
    """The request headers that open Triton's restricted APIs with ``key`` (None without a key).

    Over HTTP the header is ``admin-key``; over gRPC Triton looks for it as gRPC metadata
    prefixed ``triton-grpc-protocol-`` (tritonserver 2.51, checked against a server).
    """
    if not key:
        return None
    name = ADMIN_HEADER if Protocol(protocol) is Protocol.HTTP else f"triton-grpc-protocol-{ADMIN_HEADER}"
    return {name: key}


def is_restricted_refusal(err: Exception) -> bool:
    """Whether Triton refused an API because it is restricted and the request lacked the right key:
    HTTP 403 "This API is restricted", or gRPC UNAVAILABLE "This protocol is restricted"."""
    message = err.message() if hasattr(err, "message") else str(err)
    return "is restricted" in (message or "")


def is_transport_error(err: BaseException) -> bool:
    """Whether ``err`` means that the server could not be reached or the connection broke, so a
    retry may succeed once the server is back.

    Measured against a tritonserver killed with SIGKILL: over HTTP, the in-flight request raises
    geventhttpclient's ``HTTPConnectionClosed`` (an ``http.client.HTTPException``) and later ones
    ``ConnectionRefusedError`` (an ``OSError``, as are resets and timeouts); over gRPC both are
    ``InferenceServerException`` with status UNAVAILABLE. A restricted API also answers gRPC
    UNAVAILABLE: that one is a missing admin key, not a lost server.
    """
    if isinstance(err, (OSError, http.client.HTTPException)):
        return True
    status = err.status() if hasattr(err, "status") and callable(err.status) else None
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
        return not is_restricted_refusal(err)
    return False


def request_error(err: Exception, model: str, addr: str, n: int) -> HrnetTritonError:
    """What a failed inference request of ``n`` images means: the server lost
    (:class:`ServerUnavailableError`), overloaded (:class:`ServerOverloadedError`), or another
    failure (:class:`InferenceError`)."""
    from tritonclient.utils import InferenceServerException

    if is_transport_error(err):
        return ServerUnavailableError(f"lost the server at {addr} during a request ({type(err).__name__}: {err})")
    if not isinstance(err, InferenceServerException):
        log.debug("unexpected failure of a request", exc_info=err)
        return InferenceError(f"{model} on {addr}: a request failed ({type(err).__name__}: {err})")
    message = err.message() or str(err)
    if any(m in message.lower() for m in _OVERLOAD_MARKERS):
        return ServerOverloadedError(
            f"{model} on {addr} is overloaded and rejected a batch of {n} ({message}); "
            "retry later, send fewer requests at once (--concurrency), or raise the model's queue size"
        )
    return InferenceError(f"{model} on {addr} failed a request: {message}")


def wait_live(client: Any, addr: str, protocol: Protocol, retries: int = LIVE_RETRIES) -> None:
    """Return once the server is live; retry with backoff, then raise :class:`ServerUnavailableError`."""
    from tritonclient.utils import InferenceServerException

    delay, last = BACKOFF_S, "not live"
    for attempt in range(retries + 1):
        try:
            if client.is_server_live():
                return
            last = "not live"
        except (InferenceServerException, OSError, ConnectionError) as err:
            last = str(err) or type(err).__name__
        if attempt < retries:
            log.info("no answer from %s (%s); retrying in %.1f s", addr, last, delay)
            time.sleep(delay)
            delay *= 2
    raise ServerUnavailableError(
        f"no Triton server answers at {addr} over {protocol.value} after {retries + 1} tries ({last}). "
        "Start one with `hrnet-triton serve`, or check the address, the port and the protocol"
    )


def _model_config(client: Any, protocol: Protocol, addr: str, model: str) -> dict:
    from tritonclient.utils import InferenceServerException

    try:
        if protocol is Protocol.HTTP:
            return client.get_model_config(model)
        return client.get_model_config(model, as_json=True)["config"]
    except InferenceServerException as err:
        raise UnknownModelError(
            f"the server at {addr} has no model {model!r} ({err.message()}); {_models_served(client, protocol)}"
        ) from err


def _models_served(client: Any, protocol: Protocol) -> str:
    """ "it serves: A, B", from the repository index (an admin API: asked with ``$HRNET_TRITON_ADMIN_KEY``)."""
    from tritonclient.utils import InferenceServerException

    options = {"headers": admin_headers(protocol, admin_key())} | (
        {} if protocol is Protocol.HTTP else {"as_json": True}
    )
    try:
        index = client.get_model_repository_index(**options)
    except InferenceServerException as err:
        if is_restricted_refusal(err):
            return f"the server lists its models only to its admin: set {ADMIN_KEY_ENV} to its key to see them"
        return "it serves: nothing"
    names = sorted({m["name"] for m in (index if protocol is Protocol.HTTP else index.get("models", []))})
    return f"it serves: {', '.join(names) or 'nothing'}"


def describe(
    client: Any, addr: str, protocol: Protocol | str, model: str, *, retries: int = LIVE_RETRIES
) -> ServedModel:
    """Check that the server is live and serves ``model`` with the HRNet contract; describe it."""
    protocol = Protocol(protocol)
    wait_live(client, addr, protocol, retries)
    config = _model_config(client, protocol, addr, model)
    try:
        cfg, missing = PreprocessConfig.from_triton_config(config), None
    except ValueError as err:
        cfg, missing = DEFAULT_PREPROCESS, err
    try:
        spec = input_of(config, f"model {model!r} on {addr}", cfg.crop_size)
    except InputError as err:
        raise UnknownModelError(str(err)) from err
    if missing is not None and spec.kind != "image":  # an image model preprocesses on the server
        raise UnknownModelError(f"model {model!r} on {addr} does not carry the HRNet contract: {missing}")
    outputs = {o.get("name"): o for o in config.get("output", [])}
    if OUTPUT_NAME not in outputs:
        raise UnknownModelError(f"model {model!r} on {addr} has no {OUTPUT_NAME!r} output; is it an HRNet classifier?")
    return ServedModel(
        name=model,
        address=addr,
        protocol=protocol,
        cfg=cfg,
        max_batch=int(config.get("max_batch_size", 1)) or 1,
        labels=imagenet_labels(),
        config=config,
        input=spec,
    )


def _ready(client: Any, model: str) -> bool:
    """Whether the server serves ``model``, ready (model readiness is open to every client, unlike the index)."""
    try:
        return bool(client.is_model_ready(model))
    except Exception:  # noqa: BLE001 - an unknown model is an error over gRPC, False over HTTP
        return False


def family(model: str) -> str:
    """The variant a served name belongs to: HRNet_W18_C_image -> HRNet_W18_C."""
    for suffix in MODEL_SUFFIX.values():
        if suffix and model.endswith(suffix):
            return model.removesuffix(suffix)
    return model


def choose(
    client: Any,
    addr: str,
    protocol: Protocol | str,
    model: str,
    kind: str | None = None,
    *,
    shared_memory: bool = False,
    retries: int = LIVE_RETRIES,
) -> ServedModel:
    """The served model to send ``model``'s images to, taking ``kind`` of input.

    ``kind`` None takes what the server offers best: ``<model>_image`` if it is served (not with
    ``shared_memory``: encoded files do not go through shared memory), else ``<model>_uint8``,
    else ``model`` itself. A model named with its kind (``HRNet_W18_C_image``) is taken as it is;
    its config's ``input_kind`` says what it takes. Asking ``model`` for another kind picks its
    sibling: ``HRNet_W18_C`` with ``uint8`` is ``HRNet_W18_C_uint8``.
    """
    protocol = Protocol(protocol)
    if kind is not None and kind not in INPUT_KINDS:
        raise HrnetTritonError(f"--input {kind!r}: choose one of {', '.join(INPUT_KINDS)}")
    wait_live(client, addr, protocol, retries)
    if kind is None and family(model) == model:
        best = [k for k in ("image", "uint8") if not (shared_memory and k == "image")]
        kind = next((k for k in best if _ready(client, model_name(model, k))), None)
        if kind is not None:
            return _sibling(client, addr, protocol, model, kind)
    if kind is None:
        return describe(client, addr, protocol, model, retries=0)
    if _ready(client, model):
        served = describe(client, addr, protocol, model, retries=0)
        if served.input.kind == kind:
            return served
    return _sibling(client, addr, protocol, model, kind)


def _sibling(client: Any, addr: str, protocol: Protocol, model: str, kind: str) -> ServedModel:
    name = model_name(family(model), kind)
    try:
        served = describe(client, addr, protocol, name, retries=0)
    except UnknownModelError as err:
        raise UnknownModelError(f"{err}. --input {kind} needs {name}; choose another --input, or serve it") from err
    if served.input.kind != kind:
        raise UnknownModelError(f"{name} on {addr} takes {served.input.kind} input, not --input {kind}")
    return served


def parse_classification(entries: np.ndarray) -> list[tuple[Guess, ...]]:
    """Triton's classification extension output, ``b"<prob>:<id>:<label>"`` per entry, shape (batch, k)."""
    rows = []
    for row in np.asarray(entries).reshape(len(entries), -1):
        guesses = []
        for entry in row:
            text = entry.decode() if isinstance(entry, bytes) else str(entry)
            prob, class_id, label = (text.split(":", 2) + [""])[:3]
            guesses.append(Guess(int(class_id), label, float(prob)))
        rows.append(tuple(guesses))
    return rows
