"""Where a variant's weights come from, and loading them strictly.

``--weights`` takes one of:

- ``auto``: PaddleClas's published pretrained ``.pdparams`` for the row, downloaded once into
  the cache directory (``$HRNET_TRITON_CACHE``, else the user cache dir) and checked against the
  row's pinned SHA-256; a row without a pin is refused unless ``allow_unpinned`` (the CLI's
  ``--allow-unpinned-weights``). Set ``$HRNET_TRITON_WEIGHTS_MIRROR`` to an https URL that
  mirrors PaddleClas's ``dygraph/`` tree to download from there instead (http only to loopback);
- a path to a ``.pdparams`` file (PaddleClas dygraph weights). It is a pickle: it is read by a
  restricted unpickler that builds numpy arrays and plain containers and refuses anything else,
  so a crafted file cannot run code;
- a path to a ``*_infer.tar`` or to an unpacked inference-model directory (PaddleClas's
  exported ``inference.pdmodel``/``inference.json`` + ``inference.pdiparams``);
- ``offline``: seeded weights with calibrated BatchNorm statistics (see ``calibrate``), for
  machines without internet. Their predictions are meaningless as ImageNet labels.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import pickle
import platform
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hrnet_core.atomic import atomic_path
from hrnet_core.errors import WeightsError
from hrnet_core.variants import PADDLE_MODELS_BASE, Variant

from . import download

log = logging.getLogger(__name__)

INFERENCE_PARAMS = "inference.pdiparams"
INFERENCE_GRAPHS = ("inference.json", "inference.pdmodel")  # PIR first, then the legacy program
MIRROR_ENV = "HRNET_TRITON_WEIGHTS_MIRROR"


class WeightsKind(str, enum.Enum):
    AUTO = "auto"
    OFFLINE = "offline"
    PDPARAMS = "pdparams"
    INFERENCE_MODEL = "inference_model"


@dataclass(frozen=True)
class WeightsSpec:
    """What the user asked for with ``--weights``, parsed but not yet fetched."""

    kind: WeightsKind
    path: Path | None = None
    allow_unpinned: bool = False  # auto: download weights whose variant has no pinned SHA-256

    @classmethod
    def parse(cls, text: str, *, allow_unpinned: bool = False) -> WeightsSpec:
        if text in (WeightsKind.AUTO.value, WeightsKind.OFFLINE.value):
            return cls(WeightsKind(text), allow_unpinned=allow_unpinned)
        path = Path(text).expanduser()
        if not path.exists():
            raise WeightsError(
                f"--weights {text}: no such file or directory. Give 'auto', 'offline', a .pdparams file, "
                "a *_infer.tar or an unpacked inference-model directory"
            )
        if path.is_dir() or path.name.endswith(".tar"):
            return cls(WeightsKind.INFERENCE_MODEL, path)
        if path.suffix == ".pdparams":
            return cls(WeightsKind.PDPARAMS, path)
        raise WeightsError(
            f"--weights {text}: expected a .pdparams file, a *_infer.tar or an inference-model directory"
        )


@dataclass(frozen=True)
class InferenceModel:
    """A Paddle inference model on disk: a program file and its parameters."""

    graph: Path
    params: Path


@dataclass(frozen=True)
class Weights:
    """Resolved weights: ready to load, with their provenance."""

    kind: WeightsKind  # PDPARAMS, INFERENCE_MODEL or OFFLINE
    source: str  # URL, path, or "offline"
    sha256: str | None  # of the .pdparams / .pdiparams file; None for offline (hashed after calibration)
    path: Path | None = None  # .pdparams file or inference-model directory

    @property
    def labels_meaningful(self) -> bool:
        return self.kind is not WeightsKind.OFFLINE


def cache_dir() -> Path:
    env = os.environ.get("HRNET_TRITON_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("hrnet-triton"))


def resolve(variant: Variant, spec: WeightsSpec, *, cache: Path | None = None, progress: bool = True) -> Weights:
    """Fetch or locate the weights ``spec`` names for ``variant``."""
    cache = cache or cache_dir()
    if spec.kind is WeightsKind.OFFLINE:
        return Weights(WeightsKind.OFFLINE, "offline", None)
    if spec.kind is WeightsKind.AUTO:
        url = pretrained_url(variant)
        pin = variant.pretrained_sha256
        if pin is None and not spec.allow_unpinned:
            raise WeightsError(
                f"--weights auto: no SHA-256 is pinned for {variant.name} ({url}), so the download could not be "
                "verified and a tampered or damaged file would go unnoticed. Pin the file's hash as pretrained_sha256 "
                "in core/hrnet_core/variants.py (docs/export.md, 'Pinned hashes'), or accept the risk with "
                "`hrnet-triton export --allow-unpinned-weights`, or download and check the file yourself and pass "
                "its path with --weights"
            )
        if pin is None:
            log.warning(
                "%s: no SHA-256 pinned; downloading %s unverified (--allow-unpinned-weights)", variant.name, url
            )
        path = download.fetch(url, cache / "pdparams" / Path(url).name, sha256=pin, progress=progress)
        return Weights(WeightsKind.PDPARAMS, url, download.sha256_file(path), path)
    assert spec.path is not None
    if spec.kind is WeightsKind.PDPARAMS:
        return Weights(WeightsKind.PDPARAMS, str(spec.path), download.sha256_file(spec.path), spec.path)
    model_dir = unpack_inference_tar(spec.path, cache) if spec.path.is_file() else spec.path
    model = find_inference_model(model_dir)
    return Weights(WeightsKind.INFERENCE_MODEL, str(spec.path), download.sha256_file(model.params), model_dir)


def pretrained_url(variant: Variant) -> str:
    """The variant's pretrained weights URL, on the mirror if ``$HRNET_TRITON_WEIGHTS_MIRROR`` names one."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return variant.pretrained_url
    if not download.secure_url(mirror):
        raise WeightsError(
            f"{MIRROR_ENV}={mirror}: a weights mirror must be an https:// URL, since anyone on the way can change "
            "files sent over plain http. Plain http is accepted only for a loopback host (127.0.0.1, localhost, "
            "::1), for a file server on this machine. Set an https:// URL, or unset it to download from PaddleClas"
        )
    return mirror.rstrip("/") + variant.pretrained_url.removeprefix(PADDLE_MODELS_BASE)


def unpack_inference_tar(tar_path: Path, cache: Path) -> Path:
    """Unpack a PaddleClas ``*_infer.tar`` once into the cache; return the model directory."""
    key = download.sha256_file(tar_path)[:16]
    dest = cache / "inference" / f"{tar_path.name.removesuffix('.tar')}-{key}"
    if dest.is_dir():
        return _model_dir_in(dest)
    if not hasattr(tarfile, "data_filter"):
        raise WeightsError(
            f"{tar_path}: unpacking it safely needs tarfile's 'data' filter, which Python "
            f"{platform.python_version()} lacks. Use Python 3.10.12+, 3.11.4+ or 3.12+, or unpack the tar "
            "yourself and pass the directory with --weights"
        )
    try:
        with tarfile.open(tar_path) as tar, atomic_path(dest) as tmp:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise WeightsError(f"{tar_path}: cannot unpack the inference model ({err}); download it again") from err
    return _model_dir_in(dest)


def _model_dir_in(root: Path) -> Path:
    hits = sorted({p.parent for p in root.rglob(INFERENCE_PARAMS)})
    if len(hits) != 1:
        raise WeightsError(f"{root}: expected one directory holding {INFERENCE_PARAMS}, found {len(hits)}")
    return hits[0]


def find_inference_model(model_dir: Path) -> InferenceModel:
    params = model_dir / INFERENCE_PARAMS
    graphs = [model_dir / g for g in INFERENCE_GRAPHS if (model_dir / g).is_file()]
    if not params.is_file() or not graphs:
        raise WeightsError(
            f"{model_dir}: not a Paddle inference model: it needs {INFERENCE_PARAMS} and one of "
            f"{' or '.join(INFERENCE_GRAPHS)} (as PaddleClas's *_infer.tar files hold)"
        )
    return InferenceModel(graph=graphs[0], params=params)


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise WeightsError naming the missing, unexpected and mis-shaped keys, if any."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k} {tuple(given[k])} (network wants {tuple(expected[k])})"
        for k in expected
        if k in given and tuple(given[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = ", ".join(items[:8]) + (f", … ({len(items) - 8} more)" if len(items) > 8 else "")
        return f"\n  {len(items)} {title}: {shown}" if items else ""

    raise WeightsError(
        f"{source} does not fit this network:"
        + listing("missing", missing)
        + listing("unexpected", unexpected)
        + listing("mis-shaped", misshaped)
        + "\nCheck that the file is the PaddleClas weights of the variant you named."
    )


# What a .pdparams pickle may name: numpy arrays and what numpy needs to rebuild them, plain
# containers, and ``_codecs.encode`` (pickle protocol 2 writes bytes through it). Paddle saves a
# state dict as {name: ndarray}; a tensor outside a state dict as builtins.tuple((name, ndarray)).
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    *(("builtins", n) for n in ("dict", "list", "tuple", "str", "int", "float", "bool")),
}
_PADDLE_KEYS = ("StructuredToParameterName@@", "UnpackBigParamInfor@@")  # its name table; its split arrays


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles arrays and containers only: every other global is refused before it is imported."""

    def find_class(self, module: str, name: str):
        if (module, name) in _RECONSTRUCT:
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 1.26
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name}")


def read_pdparams(path: Path) -> dict:
    """The named arrays of a ``.pdparams`` file, unpickled without running any code of the file."""
    try:
        with open(path, "rb") as fh:
            state = _WeightsUnpickler(fh, encoding="latin1").load()
    except _ForbiddenGlobal as err:
        raise WeightsError(
            f"{path}: refused: its pickle asks for {err}, which weights never need (only numpy arrays and plain "
            "containers are allowed), so nothing of it was run. It may be crafted to run code; get the weights "
            "from PaddleClas again"
        ) from None
    except Exception as err:  # a damaged pickle raises many types
        raise WeightsError(f"{path}: not a readable .pdparams file ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a dict of named tensors, found {type(state).__name__}")
    return _named_arrays(state, path)


def _named_arrays(state: Mapping, path: Path) -> dict:
    import numpy as np

    state = dict(state)
    state.pop(_PADDLE_KEYS[0], None)
    try:  # paddle.save with protocol 2/3 splits arrays over 1 GiB into slices
        for key, info in state.pop(_PADDLE_KEYS[1], {}).items():
            state[key] = np.concatenate([state.pop(part) for part in info["slices"]]).reshape(info["OriginShape"])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{path}: its split-array table is damaged ({err}); download the file again") from err
    arrays = {}
    for key, value in state.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]  # (tensor name, array)
        if not isinstance(key, str) or not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            raise WeightsError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a numeric tensor; give PaddleClas "
                "weights (a dict of named tensors, as paddle.save(model.state_dict()) writes)"
            )
        arrays[key] = value
    return arrays


def load_pdparams(model, path: Path) -> None:
    """Load PaddleClas ``.pdparams`` into ``model`` with a strict key and shape match."""
    state = read_pdparams(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: v.shape for k, v in state.items()}, str(path))
    model.set_state_dict(state)


def state_dict_sha256(model) -> str:
    """A hash of a network's weights (names, shapes and float32 bytes, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        arr = tensor.numpy()
        digest.update(f"{name}:{arr.dtype}:{arr.shape};".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()
