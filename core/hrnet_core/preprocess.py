"""PaddleClas-exact image preprocessing: decode -> resize short side -> center crop -> normalize -> CHW.

This reproduces ``deploy/python/preprocess.py`` of PaddleClas with the parameters of
``deploy/configs/inference_cls.yaml`` (held in :class:`hrnet_core.contract.PreprocessConfig`):

1. decode with OpenCV to 8-bit, 3 channels (PaddleClas does ``cv2.imread`` then reverses the
   channels to RGB);
2. scale so the short side is ``resize_short``: each side ``int(round(side * short/min(w, h)))``,
   ``cv2.resize`` with ``INTER_LINEAR``;
3. center crop ``crop_size``: top-left ``((w - crop)//2, (h - crop)//2)``;
4. ``(img.astype(float32) * float32(scale) - mean) / std`` with float32 mean and std, in HWC;
5. HWC -> CHW.

The result is bit-identical to PaddleClas's, but computed in a cheaper order: the resize runs
on the decoded BGR array (PaddleClas resizes a reversed-stride view, which OpenCV first copies;
resizing is per channel, so the order does not change a value), the channels are picked after
the crop, and step 4 is a 256-entry table per channel, filled with the very float32 operations
PaddleClas applies to every pixel. :func:`load_tensors` also decodes several files at once on
a thread pool (OpenCV releases the GIL). ``benchmarks/preprocess_speed.py`` measures it.

What happens to images that are not plain 8-bit RGB (each is what ``cv2.imread`` does, so the
tensors stay PaddleClas's; ``tests/test_preprocess.py`` checks each against ``cv2.imread``):

- grayscale: the gray value is copied to all three channels;
- RGBA / gray+alpha: the alpha channel is dropped (not composited on any background);
- 16-bit PNG / TIFF: reduced to 8 bits by keeping the high byte (``v >> 8``);
- CMYK JPEG: converted to RGB by libjpeg, without ICC colour management;
- EXIF orientation: applied (a photo taken upright is classified upright);
- smaller than the crop: scaled up so the short side is ``resize_short``, then cropped;
- not a regular file (a FIFO, a device such as ``/dev/zero``, a socket or a directory, also
  through a symbolic link), or larger than ``max_bytes`` (default :func:`max_file_bytes`):
  refused before reading;
- more than ``max_pixels`` pixels in the header (default :data:`MAX_PIXELS`), or an aspect
  ratio so extreme that the resized image would exceed it: refused before any decoding, as a
  defence against decompression bombs.
"""

from __future__ import annotations

import functools
import io
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import imagesize
import numpy as np

from hrnet_core import atomic
from hrnet_core.contract import DEFAULT_PREPROCESS, MAX_PIXELS, PreprocessConfig
from hrnet_core.errors import ImageError

__all__ = [
    "MAX_PIXELS",
    "crop_from_bytes",
    "decode",
    "load_crop",
    "load_tensor",
    "load_tensors",
    "max_file_bytes",
    "preprocess",
    "preprocess_files",
    "read_image",
    "read_image_bytes",
    "save_batch",
    "tensor_from_bytes",
    "try_load_tensor",
]


def _check_pixels(width: int, height: int, max_pixels: int, name: str, what: str) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {what} {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a guard against decompression bombs); shrink the image or raise --max-pixels"
        )


def _decode_bgr(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> contiguous 8-bit BGR HWC, as ``cv2.imread`` reads the file."""
    if not data:
        raise ImageError(f"{name}: the file is empty; pass a JPEG, PNG, BMP, TIFF or WebP image")
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.find(b"\xff\xda"):
        # A complete JPEG has its end-of-image marker after the first start-of-scan (0xFFD9 cannot
        # occur inside entropy-coded data). Some OpenCV builds decode a cut file into a partly
        # grey image without complaint; this makes truncation an error whatever OpenCV is used.
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker); the file is incomplete")
    try:
        width, height = imagesize.get(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - a header it cannot parse is for OpenCV to judge
        width, height = -1, -1
    if width > 0 and height > 0:  # -1 for formats imagesize does not know; checked after decoding
        _check_pixels(width, height, max_pixels, name, "the header says")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{name}: not a decodable image (corrupt, truncated or not an image file)")
    _check_pixels(bgr.shape[1], bgr.shape[0], max_pixels, name, "decoded to")
    return bgr


def decode(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an 8-bit RGB HWC array, as PaddleClas reads files."""
    return np.ascontiguousarray(_decode_bgr(data, name, max_pixels)[:, :, ::-1])


def max_file_bytes(max_pixels: int = MAX_PIXELS) -> int:
    """The default cap on an image file's size: an uncompressed 8-bit RGB image of ``max_pixels``
    pixels, plus 1 MiB of headers and metadata (257 MiB for the default pixel limit)."""
    return 3 * max_pixels + 2**20


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _check_regular(st: os.stat_result, name: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ImageError(f"{name}: not a regular file ({kind}); pass image files, not pipes, devices or folders")
    if st.st_size > max_bytes:
        raise ImageError(
            f"{name}: the file is {st.st_size:,} bytes, over the limit of {max_bytes:,}; "
            "an image this large is refused unread. Raise --max-bytes if it is a real image"
        )


def _byte_limit(max_pixels: int, max_bytes: int | None) -> int:
    return max_file_bytes(max_pixels) if max_bytes is None else max_bytes


def read_image_bytes(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, max_bytes: int | None = None) -> bytes:
    """The bytes of an image file, undecoded: only a regular file of at most ``max_bytes``
    (default: that of an uncompressed ``max_pixels`` image) is read; a FIFO, a device or a larger
    file is refused unread with an :class:`ImageError`."""
    return _read_bytes(path, _byte_limit(max_pixels, max_bytes))


def _read_bytes(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    FIFOs, devices (``/dev/zero``), sockets and directories are refused, through symbolic links
    too: ``stat`` before opening, so a device is never opened, and ``fstat`` of what was opened
    (without blocking, should a FIFO have taken the file's place), so nothing slips in between.
    """
    try:
        _check_regular(os.stat(path), str(path), limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as fh:
            st = os.fstat(fd)
            _check_regular(st, str(path), limit)
            data = fh.read(st.st_size)  # a buffer of the file's size: read(limit) would allocate all of limit
            grew = fh.read(1)
    except OSError as err:
        raise ImageError(f"{path}: cannot read the file ({err.strerror or err})") from err
    if grew:
        raise ImageError(f"{path}: the file grew while it was read; classify it once it is complete")
    return data


def read_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, max_bytes: int | None = None) -> np.ndarray:
    """Read an image file (a regular file of at most ``max_bytes``) to an 8-bit RGB HWC array."""
    return decode(read_image_bytes(path, max_pixels, max_bytes), str(path), max_pixels)


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
    """PaddleClas's NormalizeImage + ToCHWImage, written as PaddleClas writes them (the reference
    for :func:`_lookup_table`, and for float inputs, which a table cannot serve)."""
    mean = np.array(cfg.mean).reshape(1, 1, 3).astype("float32")
    std = np.array(cfg.std).reshape(1, 1, 3).astype("float32")
    out = (img.astype("float32") * np.float32(cfg.scale) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


@functools.lru_cache(maxsize=8)
def _lookup_table(cfg: PreprocessConfig) -> np.ndarray:
    """(3, 256) float32: row c holds normalize(v) for channel c, v = 0..255, by the same float32
    operations :func:`normalize_chw` applies to each pixel, so a lookup equals the arithmetic."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 256, 1), (1, 256, 3))
    return np.ascontiguousarray(normalize_chw(values, cfg)[:, 0, :])


def _tensor(img: np.ndarray, order: str, cfg: PreprocessConfig) -> np.ndarray:
    """An 8-bit HWC image whose channels are in ``order`` -> the model's float32 CHW tensor."""
    crop = center_crop(resize_short(img, cfg.resize_short), cfg.crop_size)
    picks = (0, 1, 2) if order == cfg.channel_order else (2, 1, 0)
    table = _lookup_table(cfg)
    out = np.empty((3, cfg.crop_size, cfg.crop_size), np.float32)
    for c, src in enumerate(picks):
        np.take(table[c], crop[:, :, src], out=out[c])
    return out


def preprocess(rgb: np.ndarray, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> np.ndarray:
    """An 8-bit RGB HWC image -> the float32 CHW tensor the models take."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"expected an 8-bit RGB image of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return _tensor(np.ascontiguousarray(rgb), "RGB", cfg)


def load_tensor(
    path: str | os.PathLike[str],
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int | None = None,
) -> np.ndarray:
    """One image file -> the float32 CHW tensor (what ``classify`` sends for it). Only regular
    files of at most ``max_bytes`` (default :func:`max_file_bytes` of ``max_pixels``) are read."""
    return tensor_from_bytes(read_image_bytes(path, max_pixels, max_bytes), str(path), cfg, max_pixels)


def _checked_bgr(data: bytes, name: str, cfg: PreprocessConfig, max_pixels: int) -> np.ndarray:
    bgr = _decode_bgr(data, name, max_pixels)
    h, w = bgr.shape[:2]
    ratio = cfg.resize_short / min(w, h)
    _check_pixels(int(round(w * ratio)), int(round(h * ratio)), max_pixels, name, "resizing it would make")
    return bgr


def tensor_from_bytes(
    data: bytes, name: str = "<bytes>", cfg: PreprocessConfig = DEFAULT_PREPROCESS, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """An encoded image (the file's bytes) -> the float32 CHW tensor, as :func:`load_tensor` makes it.
    The server-side preprocessing model runs this same function."""
    return _tensor(_checked_bgr(data, name, cfg, max_pixels), "BGR", cfg)


def crop_from_bytes(
    data: bytes, name: str = "<bytes>", cfg: PreprocessConfig = DEFAULT_PREPROCESS, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """An encoded image -> the resized, center-cropped 8-bit image, HWC in ``cfg.channel_order``:
    what the ``uint8`` models take. Normalising it as :func:`normalize_chw` does gives exactly the
    float tensor (the models do that in their first nodes)."""
    crop = center_crop(resize_short(_checked_bgr(data, name, cfg, max_pixels), cfg.resize_short), cfg.crop_size)
    return np.ascontiguousarray(crop if cfg.channel_order == "BGR" else crop[:, :, ::-1])


def load_crop(
    path: str | os.PathLike[str],
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int | None = None,
) -> np.ndarray:
    """One image file -> the uint8 HWC crop the ``uint8`` models take (see :func:`crop_from_bytes`)."""
    return crop_from_bytes(read_image_bytes(path, max_pixels, max_bytes), str(path), cfg, max_pixels)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def try_load_tensor(
    path: str | os.PathLike[str],
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int | None = None,
) -> np.ndarray | ImageError:
    """:func:`load_tensor`, with a file that cannot be used answered by its :class:`ImageError`."""
    try:
        return load_tensor(path, cfg, max_pixels, max_bytes)
    except ImageError as err:
        return err


def load_tensors(
    paths: Sequence[str | os.PathLike[str]],
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    *,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int | None = None,
) -> list[np.ndarray | ImageError]:
    """Tensors for many files, in order, on ``workers`` threads (default: one per core, up to 8).
    A file that cannot be used gets its :class:`ImageError` in its place; the others still load.
    All of them are held at once: to stream many files, use ``Classifier.iter_files``."""
    one = functools.partial(try_load_tensor, cfg=cfg, max_pixels=max_pixels, max_bytes=max_bytes)
    workers = workers or default_workers()
    if workers == 1 or len(paths) < 2:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(workers, thread_name_prefix="preprocess") as pool:
        return list(pool.map(one, paths))


def preprocess_files(paths: Sequence[str | os.PathLike[str]], cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> np.ndarray:
    """Read and preprocess several files into one NCHW batch (any bad file raises ImageError)."""
    tensors = load_tensors(paths, cfg)
    for t in tensors:
        if isinstance(t, ImageError):
            raise t
    return np.stack(tensors)


def save_batch(x: np.ndarray, out: str | os.PathLike[str]) -> Path:
    """Write the batch ``x`` to ``out`` (``.npy`` added if missing) atomically; returns the path written."""
    out = Path(out)
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")
    with atomic.atomic_path(out, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, x)
    return out
