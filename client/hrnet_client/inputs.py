"""The three inputs a served variant takes, and what the client does for each.

Each variant is served three ways (``hrnet_core.contract.INPUT_KINDS``), and each model's
config states its way in the ``input_kind`` parameter:

- ``tensor`` (``HRNet_W18_C``): float32 NCHW ``[N, 3, 224, 224]``. The client decodes, resizes,
  crops and normalises (``hrnet_core.preprocess.load_tensor``): 602,112 bytes per image.
- ``uint8`` (``HRNet_W18_C_uint8``): the resized, center-cropped RGB image, UINT8 NHWC
  ``[N, 224, 224, 3]`` (``load_crop``): 150,528 bytes per image. The model normalises it.
- ``image`` (``HRNet_W18_C_image``): the file's bytes, unchanged, TYPE_STRING ``[N, 1]``. The
  client decodes nothing; the server decodes and preprocesses with the same core code. The
  client still refuses, unread, files that are not regular files or are over the byte limit.

:class:`ModelInput` is one model's input as its config declares it; :meth:`ModelInput.loader`
makes what is sent for one file, and :meth:`ModelInput.request` wraps a batch for tritonclient.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hrnet_core.contract import (
    CHANNELS,
    CROP_SIZE,
    DEFAULT_PREPROCESS,
    INPUT_KIND_PARAMETER,
    INPUT_KINDS,
    MAX_PIXELS,
    PreprocessConfig,
    triton_parameters,
)
from hrnet_core.errors import HrnetTritonError, ImageError
from hrnet_core.preprocess import load_crop, load_tensor, read_image_bytes, save_batch

# Each kind's datatype, as tritonclient names it and as a model config does.
DATATYPES = {"tensor": "FP32", "uint8": "UINT8", "image": "BYTES"}
_CONFIG_TYPES = {"TYPE_FP32": "FP32", "TYPE_UINT8": "UINT8", "TYPE_STRING": "BYTES"}
_NUMPY = {"FP32": np.float32, "UINT8": np.uint8, "BYTES": np.object_}


class InputError(HrnetTritonError):
    """A model's input is not one of the three kinds, or not what its config says it is."""


@dataclass(frozen=True)
class ModelInput:
    """One served model's input: its kind, tensor name, datatype and one image's dimensions."""

    kind: str
    name: str
    datatype: str  # tritonclient's: FP32, UINT8 or BYTES
    dims: tuple[int, ...]  # one image's, without the batch dimension, as the contract fixes them

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_NUMPY[self.datatype])

    @property
    def shared_memory(self) -> bool:
        """Whether the input can go through shared memory: fixed-size tensors can, encoded files cannot."""
        return self.kind != "image"

    @property
    def image_bytes(self) -> int:
        """Bytes of one image's input (for the image kind: none fixed, 0)."""
        return 0 if self.kind == "image" else int(np.prod(self.dims)) * self.dtype.itemsize

    def loader(
        self, cfg: PreprocessConfig = DEFAULT_PREPROCESS, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None
    ) -> Callable[[str | os.PathLike[str]], np.ndarray | ImageError]:
        """A function: a file -> what is sent for it (or its :class:`ImageError`)."""
        return loader(self.kind, cfg, max_pixels, max_bytes)

    def load(
        self, path: str | os.PathLike[str], cfg: PreprocessConfig = DEFAULT_PREPROCESS, max_pixels: int = MAX_PIXELS
    ) -> np.ndarray:
        """What is sent for the file ``path``; a file that cannot be used raises its :class:`ImageError`."""
        result = _try_load(self.kind, path, cfg=cfg, max_pixels=max_pixels, max_bytes=None)
        if isinstance(result, ImageError):
            raise result
        return result

    def request(self, tc: Any, batch: np.ndarray) -> Any:
        """``tc.InferInput`` (``tc``: ``tritonclient.http`` or ``.grpc``) holding ``batch``."""
        inp = tc.InferInput(self.name, list(batch.shape), self.datatype)
        inp.set_data_from_numpy(batch)
        return inp

    def describe(self) -> str:
        what = {"tensor": "preprocessed float32 tensors", "uint8": "uint8 crops", "image": "the files' bytes"}
        return f"{self.kind} ({what[self.kind]}, {self.datatype} {list(self.dims)} per image)"


def contract_dims(kind: str, crop: int = CROP_SIZE) -> tuple[int, ...]:
    """One image's dimensions for ``kind``: (3, crop, crop), (crop, crop, 3), or (1,) for the file."""
    return {"tensor": (CHANNELS, crop, crop), "uint8": (crop, crop, CHANNELS), "image": (1,)}[kind]


def input_of(config: dict, model: str = "the model", crop: int = CROP_SIZE) -> ModelInput:
    """The input a model config (Triton's JSON, over HTTP or gRPC) declares, checked against its kind
    and the contract's dimensions (a config may leave some free, as -1: the contract fills them)."""
    inputs = config.get("input", [])
    if len(inputs) != 1:
        raise InputError(f"{model} has {len(inputs)} inputs; an HRNet classifier has one")
    spec = inputs[0]
    datatype = _CONFIG_TYPES.get(spec.get("data_type", ""))
    dims = tuple(int(d) for d in spec.get("dims", []))  # over gRPC the JSON writes int64 as strings
    kind = triton_parameters(config).get(INPUT_KIND_PARAMETER)
    if kind is None:  # a config without the parameter (the harness's trivial model): read the datatype
        kind = next((k for k, t in DATATYPES.items() if t == datatype), None)
    want = contract_dims(kind, crop) if kind in INPUT_KINDS else ()
    if kind not in INPUT_KINDS or DATATYPES[kind] != datatype or len(dims) != len(want):
        raise InputError(
            f"{model}'s input {spec.get('name')!r} is {spec.get('data_type')} {list(dims)} with "
            f"{INPUT_KIND_PARAMETER} {kind!r}; expected one of "
            f"{', '.join(f'{k} ({t} {list(contract_dims(k, crop))})' for k, t in DATATYPES.items())}. "
            "Write its config with `hrnet-triton repo`"
        )
    if any(d not in (w, -1) for d, w in zip(dims, want)):
        raise InputError(f"{model}'s input is {list(dims)}; the {kind} input is {list(want)} (crop size {crop})")
    return ModelInput(kind, str(spec.get("name")), datatype, want)


def loader(
    kind: str, cfg: PreprocessConfig = DEFAULT_PREPROCESS, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None
) -> Callable[[str | os.PathLike[str]], np.ndarray | ImageError]:
    """A function: a file -> the ``kind`` input for it (or its :class:`ImageError`)."""
    return functools.partial(_try_load, kind, cfg=cfg, max_pixels=max_pixels, max_bytes=max_bytes)


def _try_load(
    kind: str, path: str | os.PathLike[str], *, cfg: PreprocessConfig, max_pixels: int, max_bytes: int | None
) -> np.ndarray | ImageError:
    try:
        if kind == "tensor":
            return load_tensor(path, cfg, max_pixels, max_bytes)
        if kind == "uint8":
            return load_crop(path, cfg, max_pixels, max_bytes)
        return encoded(path, max_pixels, max_bytes)
    except ImageError as err:
        return err


def encoded(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, max_bytes: int | None = None) -> np.ndarray:
    """A file's bytes, unchanged, as the one element of a BYTES array of shape ``(1,)``.

    Nothing is decoded. Only a regular file of at most ``max_bytes`` (default: that of an
    uncompressed ``max_pixels`` image) is read; a FIFO, a device or a larger file is refused unread.
    """
    element = np.empty(1, dtype=np.object_)
    element[0] = read_image_bytes(path, max_pixels, max_bytes)
    return element


def save_input(
    image: str | os.PathLike[str],
    out: str | os.PathLike[str],
    kind: str = "tensor",
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[Path, np.ndarray]:
    """Write the batch of one that ``classify`` sends for ``image`` to ``out`` (``.npy`` added), atomically:
    float32 ``[1, 3, 224, 224]`` for ``tensor``, uint8 ``[1, 224, 224, 3]`` for ``uint8``."""
    if kind not in ("tensor", "uint8"):
        raise InputError(f"preprocess writes the tensor or uint8 input, not {kind!r}: the image input is the file")
    x = (load_tensor if kind == "tensor" else load_crop)(image, cfg, max_pixels)[np.newaxis]
    return save_batch(x, out), x
