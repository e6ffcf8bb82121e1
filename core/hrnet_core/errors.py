"""The project's exception family.

Every message says what went wrong and what to do about it. The command line turns any
``HrnetTritonError`` into that message and a non-zero exit, without a traceback.
"""

from __future__ import annotations


class HrnetTritonError(Exception):
    """Base class: a failure the user can act on. ``str(err)`` is the whole message."""

    exit_code = 1


class UnknownVariantError(HrnetTritonError, KeyError):
    """A model name that is not one of the seed variants."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(HrnetTritonError):
    """Weights are missing, cannot be fetched, or do not fit the network."""


class DownloadError(WeightsError):
    """A download failed, was truncated, or did not match its expected size or hash."""


class ExportError(HrnetTritonError):
    """The Paddle -> ONNX conversion failed or produced a model of the wrong form."""


class EngineError(HrnetTritonError):
    """A TensorRT plan cannot be built, fails its check, or does not fit the pinned release."""


class ParityError(HrnetTritonError):
    """A converted model disagrees with its reference beyond its gate's limits (export or engine)."""


class ManifestError(HrnetTritonError):
    """A manifest beside a build output is missing, unreadable or of another kind."""


class ImageError(HrnetTritonError):
    """An image file cannot be read or decoded."""
