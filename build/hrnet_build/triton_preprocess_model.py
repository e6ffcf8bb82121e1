"""Triton ``python``-backend model ``hrnet_preprocess``: encoded images -> the tensor models' input.

`hrnet-triton repo` copies this file to ``hrnet_preprocess/1/model.py``. The ``<variant>_image``
ensembles send it the bytes of image files (TYPE_STRING ``image`` [N, 1]); it answers with the
float32 NCHW tensor ``x`` [N, 3, 224, 224] that the client would have sent, made by the very same
function: ``hrnet_core.preprocess.tensor_from_bytes`` (PaddleClas-exact, the header's pixel
limit checked before decoding, EXIF orientation, grayscale, 16-bit, CMYK, small images). So
``hrnet_core`` must be importable in the serving environment: ``make serve-env`` installs it in
``.venv-serve``, the Dockerfile's ``server`` stage in the image (docs/inputs.md).

The preprocessing contract and the pixel limit are read from this model's own config
(``parameters``). A request with an image that cannot be used is answered with its own error
(INVALID_ARG, HTTP 400), naming each bad image's index in the request and what is wrong; the
other requests of the same dynamic batch still get their tensors. A batch's images are decoded
on ``decode_threads`` threads (OpenCV releases the GIL).
"""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "image"
OUTPUT = "x"
MAX_REPORTED = 4  # bad images named in one error message; the rest are counted


@dataclass(frozen=True)
class BadImage:
    message: str
    internal: bool = False  # a failure of the server's, not the image's


class TritonPythonModel:
    def initialize(self, args):
        try:
            import hrnet_core
            from hrnet_core.contract import PreprocessConfig, triton_parameters
            from hrnet_core.errors import ImageError
            from hrnet_core.preprocess import tensor_from_bytes
            from hrnet_core.runtime import python_backend_problem
        except ImportError as err:
            raise pb_utils.TritonModelException(
                f"hrnet_preprocess needs this project's hrnet_core in the serving environment ({err}): "
                "`make serve-env` installs it in .venv-serve; the Dockerfile's server stage in the image"
            ) from err
        if problem := python_backend_problem():
            raise pb_utils.TritonModelException(problem)
        config = json.loads(args["model_config"])
        params = triton_parameters(config)
        self.cfg = PreprocessConfig.from_triton_config(config)
        self.max_pixels = int(params["max_pixels"])
        self.image_error = ImageError
        self.tensor_from_bytes = tensor_from_bytes
        threads = int(params.get("decode_threads", "1") or 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        pb_utils.Logger.log_info(
            f"hrnet_preprocess: hrnet_core {hrnet_core.__version__} from {hrnet_core.__file__}, "
            f"max_pixels {self.max_pixels}, {threads} decode thread(s), {self.cfg}"
        )

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy().reshape(-1) for r in requests]
        jobs = [
            (data, f"image at index {j} of the request's {len(imgs)}") for imgs in images for j, data in enumerate(imgs)
        ]
        decoded = (
            list(self.pool.map(self._decode, jobs)) if self.pool and len(jobs) > 1 else list(map(self._decode, jobs))
        )
        responses, start = [], 0
        for imgs in images:
            mine = decoded[start : start + len(imgs)]
            start += len(imgs)
            errors = [d for d in mine if isinstance(d, BadImage)]
            if errors:
                responses.append(pb_utils.InferenceResponse(error=_combined(errors)))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, np.stack(mine))]))
        return responses

    def _decode(self, job):
        """One image's tensor, or the :class:`BadImage` that says why it cannot be used."""
        data, name = job
        try:
            return self.tensor_from_bytes(bytes(data), name, self.cfg, self.max_pixels)
        except self.image_error as err:
            return BadImage(_server_side(str(err)))
        except Exception as err:  # noqa: BLE001 - one image must not fail its batch's other requests
            return BadImage(f"{name}: preprocessing failed unexpectedly ({type(err).__name__}: {err})", internal=True)


def _server_side(message):
    """A core message, with the client's advice turned into the server's: the limit here is this model's."""
    return message.replace("raise --max-pixels", "ask the server's operator to raise hrnet_preprocess's max_pixels")


def _combined(errors):
    """One request's error: every bad image (up to MAX_REPORTED, then a count); a client error if any is one."""
    messages = [e.message for e in errors[:MAX_REPORTED]]
    if len(errors) > MAX_REPORTED:
        messages.append(f"and {len(errors) - MAX_REPORTED} more bad images")
    return _error("; ".join(messages), "INTERNAL" if all(e.internal for e in errors) else "INVALID_ARG")


def _error(message, code_name):
    code = getattr(pb_utils.TritonError, code_name, None)  # absent from python backends before error codes
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
