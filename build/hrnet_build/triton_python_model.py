"""Triton ``python``-backend model: an exported HRNet run by OpenVINO or ONNX Runtime (the ``cpu`` target).

`hrnet-triton repo --target cpu` copies this file to ``<model>/1/model.py`` beside
``model.onnx``: the float32 model of ``<variant>`` and the uint8 one of ``<variant>_uint8``
(docs/inputs.md); it serves whichever input type its ONNX model takes. It runs inside Triton's
Python backend stub, in the environment whose ``bin/`` is first on ``PATH`` when the server
starts (``.venv-serve``, where the project is installed), and runs the model through
``hrnet_core.runtime.cpu_runner``: the very runner the build's gates and the benchmarks use.
The config's parameters name the runtime (``runtime``: openvino or onnxruntime), its
``precision`` (fp32, or bf16 with OpenVINO on a CPU with native BF16) and ``runtime_threads``
(docs/cpu-speed.md). Each instance compiles the model once, when it loads.

Every dynamic batch Triton forms is run as one runtime call; the outputs are split back
per request. A request whose float input holds NaN or ±Inf is answered with its own error
(INVALID_ARG, HTTP 400) and left out of that call (uint8 pixels are always finite), so the
other requests of its batch still get their probabilities, in order.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "x"
OUTPUT = "probabilities"


class TritonPythonModel:
    def initialize(self, args):
        try:
            from hrnet_core.contract import triton_parameters
            from hrnet_core.errors import HrnetTritonError
            from hrnet_core.runtime import ONNXRUNTIME, cpu_runner, python_backend_problem
        except ImportError as err:
            raise pb_utils.TritonModelException(
                f"{args['model_name']} needs this project's hrnet_core in the serving environment ({err}): "
                "`make serve-env` installs it in .venv-serve; the Dockerfile's server stage in the image"
            ) from err
        if problem := python_backend_problem():
            raise pb_utils.TritonModelException(problem)
        config = json.loads(args["model_config"])
        params = triton_parameters(config)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(
                f"{path} is missing; write the repository with `hrnet-triton repo --target cpu --onnx-dir DIR`"
            )
        self.runtime = params.get("runtime") or ONNXRUNTIME  # repositories written before OpenVINO
        precision = params.get("precision") or "fp32"
        try:
            self.runner = cpu_runner(
                path, self.runtime, threads=int(params.get("runtime_threads") or 0), precision=precision
            )
        except HrnetTritonError as err:  # e.g. bf16 asked on a CPU without native BF16
            raise pb_utils.TritonModelException(f"{args['model_name']}: {err}") from err

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy() for r in requests]
        responses = [None] * len(requests)
        good = []
        for i, a in enumerate(arrays):
            bad = int(a.size - np.count_nonzero(np.isfinite(a))) if a.dtype.kind == "f" else 0
            if bad:
                responses[i] = pb_utils.InferenceResponse(error=_invalid_input(bad))
            else:
                good.append(i)
        if not good:
            return responses
        batch = np.concatenate([arrays[i] for i in good]) if len(good) > 1 else arrays[good[0]]
        try:
            probs = self.runner.run(batch)
        except Exception as err:  # report to every caller instead of failing the model
            error = pb_utils.TritonError(f"{self.runner.name} failed on a batch of {len(batch)}: {err}")
            for i in good:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses
        start = 0
        for i in good:
            n = arrays[i].shape[0]
            out = pb_utils.Tensor(OUTPUT, np.ascontiguousarray(probs[start : start + n]))
            responses[i] = pb_utils.InferenceResponse([out])
            start += n
        return responses


def _invalid_input(count):
    """The error for a request with ``count`` non-finite values: a client error (400), not a server one."""
    message = f"input {INPUT} holds {count} non-finite values (NaN/Inf); send finite, preprocessed pixels"
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)  # absent from python backends before error codes
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
