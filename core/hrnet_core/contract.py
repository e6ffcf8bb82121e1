"""The serving contract every variant shares: tensor names, shapes and preprocessing.

The exported ONNX models, the Triton configs and the client all read these values from here,
so a model of any width is called the same way. The preprocessing defaults are PaddleClas's
inference pipeline (``deploy/configs/inference_cls.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INPUT_NAME = "x"  # PaddleClas's name for the image input of its inference models
OUTPUT_NAME = "probabilities"  # softmax over the 1000 ImageNet classes
NUM_CLASSES = 1000
CHANNELS = 3
CROP_SIZE = 224
ONNX_OPSET = 17


# The default pixel limit for input images, checked from the header before decoding: Pillow's
# own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS), about 0.25 GiB decoded as
# 8-bit RGB. A 24-megapixel camera photograph is well inside it.
MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class PreprocessConfig:
    """PaddleClas's ResizeImage -> CropImage -> NormalizeImage -> ToCHWImage, as parameters.

    ``scale`` is kept as PaddleClas's config writes it (0.00392157, not exactly 1/255) so the
    tensors agree bit for bit with PaddleClas's own pipeline.
    """

    resize_short: int = 256
    crop_size: int = CROP_SIZE
    scale: float = 0.00392157
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    interpolation: str = "INTER_LINEAR"

    def __post_init__(self) -> None:
        if self.crop_size <= 0 or self.resize_short < self.crop_size:
            raise ValueError(f"resize_short ({self.resize_short}) must be >= crop_size ({self.crop_size}) > 0")
        if len(self.mean) != CHANNELS or len(self.std) != CHANNELS or min(self.std) <= 0:
            raise ValueError(f"mean and std need {CHANNELS} values, std > 0; got {self.mean}, {self.std}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.layout != "NCHW":
            raise ValueError(f"only the NCHW layout is supported, got {self.layout!r}")
        if self.interpolation != "INTER_LINEAR":
            raise ValueError(f"only cv2 INTER_LINEAR resizing is supported, got {self.interpolation!r}")

    def to_parameters(self) -> dict[str, str]:
        """The contract as Triton config ``parameters`` (string values)."""
        return {
            "resize_short": str(self.resize_short),
            "crop_size": str(self.crop_size),
            "scale": repr(self.scale),
            "mean": ",".join(repr(m) for m in self.mean),
            "std": ",".join(repr(s) for s in self.std),
            "channel_order": self.channel_order,
            "layout": self.layout,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> PreprocessConfig:
        """Read the contract back from a model config's ``parameters``."""
        missing = [k for k in cls().to_parameters() if k not in params]
        if missing:
            raise ValueError(f"the model config lacks preprocessing parameters {missing}")

        def triple(key: str) -> tuple[float, float, float]:
            a, b, c = (float(x) for x in params[key].split(","))
            return (a, b, c)

        return cls(
            resize_short=int(params["resize_short"]),
            crop_size=int(params["crop_size"]),
            scale=float(params["scale"]),
            mean=triple("mean"),
            std=triple("std"),
            channel_order=params["channel_order"],
            layout=params["layout"],
            interpolation=params["interpolation"],
        )

    @classmethod
    def from_triton_config(cls, config: Any) -> PreprocessConfig:
        """Read the contract from a model config: the JSON a server returns, or a ``ModelConfig`` message."""
        return cls.from_parameters(triton_parameters(config))


def triton_parameters(config: Any) -> dict[str, str]:
    """A model config's ``parameters`` as plain strings, from the JSON form (what Triton's model
    config API returns) or from Triton's ``ModelConfig`` protobuf message."""
    if isinstance(config, dict):
        return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return {k: v.string_value for k, v in config.parameters.items()}


DEFAULT_PREPROCESS = PreprocessConfig()


# Triton's admin APIs (shared-memory registration, model loading, statistics, trace, logging)
# answer only requests that carry this header with the deployment's key: the server is started
# with --http-restricted-api / --grpc-restricted-protocol naming them (docs/security.md).
# Inference, health, metadata and model config stay open: a client needs nothing else.
ADMIN_HEADER = "admin-key"
ADMIN_KEY_ENV = "HRNET_TRITON_ADMIN_KEY"
RESTRICTED_APIS = ("shared-memory", "model-repository", "statistics", "trace", "logging")


# -- the three ways to call one variant (docs/inputs.md) -------------------------------------------
#
#   <variant>          "tensor": float32 NCHW [N, 3, 224, 224], preprocessed by the caller;
#   <variant>_uint8    "uint8": the resized, center-cropped RGB image as UINT8 NHWC [N, 224, 224, 3];
#                      the normalisation and the transpose are the first nodes of the model itself;
#   <variant>_image    "image": the encoded file's bytes (JPEG, PNG, BMP, TIFF, WebP) as TYPE_STRING
#                      [N, 1]; an ensemble of the server-side preprocessing model and the tensor model.
#
# Every config states its kind in the ``input_kind`` parameter, so a client needs no flag to know.
INPUT_KINDS = ("tensor", "uint8", "image")
INPUT_KIND_PARAMETER = "input_kind"
IMAGE_INPUT_NAME = "image"
PREPROCESS_MODEL = "hrnet_preprocess"
MODEL_SUFFIX = {"tensor": "", "uint8": "_uint8", "image": "_image"}


def model_name(variant: str, kind: str) -> str:
    """The served name of ``variant`` for one input kind: HRNet_W18_C, HRNet_W18_C_uint8, HRNet_W18_C_image."""
    return variant + MODEL_SUFFIX[kind]
