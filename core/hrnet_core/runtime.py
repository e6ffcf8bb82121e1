"""One interface for every runtime that turns a preprocessed batch into probabilities.

A :class:`Runner` answers ``run(batch) -> probabilities`` for a float32 NCHW batch. Paddle
Inference (``hrnet_build.export``), ONNX Runtime (here: it is the reference every later stage is
gated against), TensorRT (``hrnet_build.engine``) and a Triton server (``hrnet_client.triton``)
all implement it, so one comparison (:func:`hrnet_core.parity.compare`) serves every gate and
one classifier (``hrnet_client.classify``) serves every runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from hrnet_core.contract import INPUT_NAME, OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError


@runtime_checkable
class Runner(Protocol):
    """Something that computes class probabilities for a batch of preprocessed images."""

    name: str  # for reports: "ONNX Runtime", "Paddle Inference", "TensorRT fp16", "Triton HTTP"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 (N, NUM_CLASSES) probabilities (uint8 (N, H, W, 3) crops
        for a model of the ``uint8`` kind, :mod:`hrnet_core.contract`)."""
        ...


class OnnxRuntimeRunner:
    """An exported model run in-process by ONNX Runtime on the CPU."""

    name = "ONNX Runtime"

    def __init__(self, onnx_path: str | os.PathLike[str], *, threads: int = 0):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise HrnetTritonError(f"{path}: no such ONNX model; create it with `hrnet-triton export`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # float32 NCHW tensors for the tensor models; the uint8 models take the 8-bit NHWC crops
        self.input_dtype = np.dtype(np.uint8 if self.session.get_inputs()[0].type == "tensor(uint8)" else np.float32)

    @property
    def metadata(self) -> dict[str, str]:
        """The ONNX model's ``metadata_props`` (the export stage records the variant and weights)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if self.input_dtype == np.uint8 and batch.dtype != np.uint8:
            raise HrnetTritonError(
                f"{self.path.name} takes uint8 crops (N, 224, 224, 3), got a {batch.dtype} batch; "
                "feed it hrnet_core.preprocess.load_crop's output, not a normalised tensor"
            )
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch.astype(self.input_dtype, copy=False)})[0]
