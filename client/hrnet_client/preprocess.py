"""PaddleClas-exact image preprocessing: decode -> resize short side -> center crop -> normalize -> CHW.

This reproduces ``deploy/python/preprocess.py`` of PaddleClas with the parameters of
``deploy/configs/inference_cls.yaml`` (held in :class:`hrnet_triton.contract.PreprocessConfig`):

1. decode with OpenCV to 8-bit, 3 channels, then BGR -> RGB (PaddleClas does ``cv2.imread``
   then reverses the channels);
2. scale so the short side is ``resize_short``: each side ``int(round(side * short/min(w, h)))``,
   ``cv2.resize`` with ``INTER_LINEAR``;
3. center crop ``crop_size``: top-left ``((w - crop)//2, (h - crop)//2)``;
4. ``(img.astype(float32) * float32(scale) - mean) / std`` with float32 mean and std, in HWC;
5. HWC -> CHW.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from hrnet_triton.contract import DEFAULT_PREPROCESS, PreprocessConfig
from hrnet_triton.errors import ImageError


def decode(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an 8-bit RGB HWC array, as PaddleClas reads files."""
    if not data:
        raise ImageError(f"{name}: the file is empty; pass a JPEG, PNG, BMP, TIFF or WebP image")
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.find(b"\xff\xda"):
        # A complete JPEG has its end-of-image marker after the first start-of-scan (0xFFD9 cannot
        # occur inside entropy-coded data). Some OpenCV builds decode a cut file into a partly
        # grey image without complaint; this makes truncation an error whatever OpenCV is used.
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker); the file is incomplete")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{name}: not a decodable image (corrupt, truncated or not an image file)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file to an 8-bit RGB HWC array."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ImageError(f"{path}: cannot read the file ({err.strerror or err})") from err
    return decode(data, str(path))


def resize_short(img: np.ndarray, short: int) -> np.ndarray:
    h, w = img.shape[:2]
    ratio = float(short) / min(w, h)
    size = (int(round(w * ratio)), int(round(h * ratio)))
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ImageError(f"image of {w}x{h} is smaller than the {size}x{size} crop after resizing")
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def normalize_chw(img: np.ndarray, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> np.ndarray:
    mean = np.array(cfg.mean).reshape(1, 1, 3).astype("float32")
    std = np.array(cfg.std).reshape(1, 1, 3).astype("float32")
    out = (img.astype("float32") * np.float32(cfg.scale) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def preprocess(rgb: np.ndarray, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> np.ndarray:
    """An 8-bit RGB HWC image -> the float32 CHW tensor the models take."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"expected an 8-bit RGB image of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    img = rgb if cfg.channel_order == "RGB" else rgb[:, :, ::-1]
    return normalize_chw(center_crop(resize_short(img, cfg.resize_short), cfg.crop_size), cfg)


def preprocess_files(
    paths: Sequence[str | os.PathLike[str]], cfg: PreprocessConfig = DEFAULT_PREPROCESS
) -> np.ndarray:
    """Read and preprocess several files into one NCHW batch (any bad file raises ImageError)."""
    return np.stack([preprocess(read_image(p), cfg) for p in paths])
