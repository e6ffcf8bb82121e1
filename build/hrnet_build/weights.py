"""Where a variant's weights come from, and loading them strictly.

``--weights`` takes one of:

- ``auto``: PaddleClas's published pretrained ``.pdparams`` for the row, downloaded once into
  the cache directory (``$HRNET_TRITON_CACHE``, else the user cache dir). Set
  ``$HRNET_TRITON_WEIGHTS_MIRROR`` to a URL that mirrors PaddleClas's ``dygraph/`` tree to
  download from there instead;
- a path to a ``.pdparams`` file (PaddleClas dygraph weights);
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

    @classmethod
    def parse(cls, text: str) -> WeightsSpec:
        if text in (WeightsKind.AUTO.value, WeightsKind.OFFLINE.value):
            return cls(WeightsKind(text))
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
        path = download.fetch(url, cache / "pdparams" / Path(url).name, progress=progress)
        return Weights(WeightsKind.PDPARAMS, url, download.sha256_file(path), path)
    assert spec.path is not None
    if spec.kind is WeightsKind.PDPARAMS:
        return Weights(WeightsKind.PDPARAMS, str(spec.path), download.sha256_file(spec.path), spec.path)
    model_dir = unpack_inference_tar(spec.path, cache) if spec.path.is_file() else spec.path
    model = find_inference_model(model_dir)
    return Weights(WeightsKind.INFERENCE_MODEL, str(spec.path), download.sha256_file(model.params), model_dir)


def pretrained_url(variant: Variant) -> str:
    """The variant's pretrained weights URL, on the mirror if ``$HRNET_TRITON_WEIGHTS_MIRROR`` names one."""
    mirror = os.environ.get("HRNET_TRITON_WEIGHTS_MIRROR")
    if not mirror:
        return variant.pretrained_url
    return mirror.rstrip("/") + variant.pretrained_url.removeprefix(PADDLE_MODELS_BASE)


def unpack_inference_tar(tar_path: Path, cache: Path) -> Path:
    """Unpack a PaddleClas ``*_infer.tar`` once into the cache; return the model directory."""
    key = download.sha256_file(tar_path)[:16]
    dest = cache / "inference" / f"{tar_path.name.removesuffix('.tar')}-{key}"
    if dest.is_dir():
        return _model_dir_in(dest)
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


def load_pdparams(model, path: Path) -> None:
    """Load PaddleClas ``.pdparams`` into ``model`` with a strict key and shape match."""
    import numpy as np
    import paddle

    try:
        state = paddle.load(str(path))
    except Exception as err:  # paddle raises many types for unreadable files
        raise WeightsError(f"{path}: not a readable .pdparams file ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a dict of named tensors, found {type(state).__name__}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(np.shape(v)) for k, v in state.items()}
    check_state_dict(expected, given, str(path))
    model.set_state_dict(state)


def state_dict_sha256(model) -> str:
    """A hash of a network's weights (names, shapes and float32 bytes, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        arr = tensor.numpy()
        digest.update(f"{name}:{arr.dtype}:{arr.shape};".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()
