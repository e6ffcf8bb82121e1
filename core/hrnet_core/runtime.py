"""One interface for every runtime that turns a preprocessed batch into probabilities.

A :class:`Runner` answers ``run(batch) -> probabilities`` for a float32 NCHW batch. Paddle
Inference (``hrnet_build.export``), ONNX Runtime (here: it is the reference every later stage is
gated against), OpenVINO (here: the cpu target's runtime, which the server's python backend runs
through this very class), TensorRT (``hrnet_build.engine``) and a Triton server
(``hrnet_client.triton``) all implement it, so one comparison (:func:`hrnet_core.parity.compare`) serves every gate and
one classifier (``hrnet_client.classify``) serves every runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from hrnet_core.contract import INPUT_NAME, OUTPUT_NAME
from hrnet_core.errors import HrnetTritonError


def python_backend_problem() -> str | None:
    """Why this environment cannot serve through Triton's python backend, or None when it can.

    Measured: the stub shipped with tritonserver 2.51 (nvidia-pytriton 0.7.0) returns empty output
    tensors under numpy 2 (docs/repository.md), so both python-backend models refuse to load there.
    """
    if int(np.__version__.split(".")[0]) >= 2:
        return (
            f"numpy {np.__version__} is installed in the serving environment; Triton's python backend "
            "stub of this release returns empty outputs with numpy 2. Start the server from an "
            "environment with numpy<2 (`make serve-env` creates .venv-serve)."
        )
    return None


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


# The CPU runtimes of the cpu and onnx targets, and the precisions each can run at.
OPENVINO, ONNXRUNTIME = "openvino", "onnxruntime"
CPU_RUNTIMES = (OPENVINO, ONNXRUNTIME)
CPU_PRECISIONS = {OPENVINO: ("fp32", "bf16"), ONNXRUNTIME: ("fp32",)}
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def require_cpu_precision(runtime: str, precision: str) -> None:
    """Raise unless ``runtime`` (openvino, onnxruntime) runs at ``precision`` (fp32, bf16)."""
    if runtime not in CPU_PRECISIONS:
        raise HrnetTritonError(f"unknown CPU runtime {runtime!r}: choose one of {', '.join(CPU_RUNTIMES)}")
    if precision not in CPU_PRECISIONS[runtime]:
        raise HrnetTritonError(
            f"{runtime} runs at {', '.join(CPU_PRECISIONS[runtime])}, not {precision}"
            + ("; bf16 needs the openvino runtime" if precision == "bf16" else "")
        )


def native_bf16(core=None) -> bool:
    """Whether this CPU computes BF16 natively (AVX512_BF16 or AMX), as OpenVINO's CPU plugin sees it."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRunner:
    """An exported model compiled by OpenVINO for this machine's CPU, at FP32 or BF16.

    One stream and ``threads`` inference threads (0: OpenVINO's choice, one per core), without
    pinning threads to cores: the server runs one runner per model instance, each in its own
    process, and pinned runners of two processes land on the same core (measured in
    docs/cpu-speed.md). BF16 is refused on a CPU without native BF16 rather than emulated.
    """

    def __init__(self, onnx_path: str | os.PathLike[str], *, threads: int = 0, precision: str = "fp32"):
        import openvino as ov

        require_cpu_precision(OPENVINO, precision)
        path = Path(onnx_path)
        if not path.is_file():
            raise HrnetTritonError(f"{path}: no such ONNX model; create it with `hrnet-triton export`")
        core = ov.Core()
        if precision == "bf16" and not native_bf16(core):
            raise HrnetTritonError(
                f"this CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}) has no native BF16 (AVX512_BF16 or "
                "AMX): OpenVINO would emulate it slower than FP32. Serve it at --precision fp32"
            )
        config = {
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.path, self.precision = path, precision
        self.name = f"OpenVINO {precision}"
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_dtype = np.dtype(np.uint8 if self.compiled.input(0).element_type == ov.Type.u8 else np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if self.input_dtype == np.uint8 and batch.dtype != np.uint8:
            raise HrnetTritonError(f"{self.path.name} takes uint8 crops (N, 224, 224, 3), got a {batch.dtype} batch")
        outputs = self.request.infer({0: np.ascontiguousarray(batch, dtype=self.input_dtype)})
        return np.array(outputs[0], copy=True)  # the request reuses its output buffer on the next call


def cpu_runner(onnx_path: str | os.PathLike[str], runtime: str, *, threads: int = 0, precision: str = "fp32") -> Runner:
    """The runner of ``runtime`` (openvino or onnxruntime) for an exported model."""
    require_cpu_precision(runtime, precision)
    if runtime == OPENVINO:
        return OpenVinoRunner(onnx_path, threads=threads, precision=precision)
    return OnnxRuntimeRunner(onnx_path, threads=threads)
