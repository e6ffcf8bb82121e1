"""Manifests: the JSON record written beside every build output, and read back by later stages.

``X.onnx`` gets ``X.onnx.json`` (:class:`ExportManifest`), ``X.plan`` gets ``X.plan.json``
(:class:`PlanManifest`): what was built, from what, with which tools, and how its parity gate
went. One base class writes (atomically) and reads every kind, rebuilding the nested records.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hrnet_core import atomic
from hrnet_core.contract import CHANNELS, CROP_SIZE
from hrnet_core.errors import EngineError, ManifestError
from hrnet_core.parity import ParityReport

M = TypeVar("M", bound="Manifest")

MAX_SUPPORTED_BATCH = 256


def manifest_path(artifact: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.onnx.json``; ``model.plan`` -> ``model.plan.json``."""
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _build(kind: Any, value: Any) -> Any:
    """Rebuild a value of type ``kind`` from its JSON form (nested dataclasses and tuples)."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind) and isinstance(value, dict):
        hints = typing.get_type_hints(kind)
        return kind(
            **{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(kind) if f.name in value}
        )
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class Manifest:
    """Base of every manifest: ``write`` beside the artifact, ``read`` back with a clear error."""

    kind: ClassVar[str] = "manifest"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def write(self, artifact: str | os.PathLike[str]) -> Path:
        path = manifest_path(artifact)
        atomic.write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls: type[M], path: str | os.PathLike[str]) -> M:
        """Read a manifest file (``X.onnx.json``) or the manifest of an artifact (``X.onnx``)."""
        path = Path(path)
        if not path.name.endswith(".json"):
            path = manifest_path(path)
        try:
            data = json.loads(path.read_text())
            if data.pop("kind", cls.kind) != cls.kind:
                raise ValueError(f"not a {cls.kind} manifest")
            return _build(cls, data)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ManifestError(
                f"{path}: not a readable {cls.kind} manifest ({err}); build the file again with `hrnet-triton "
                f"{'export' if cls.kind == 'export' else 'engine'}`"
            ) from err


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple[int, ...]  # -1 for the dynamic batch dimension


@dataclass(frozen=True)
class ExportManifest(Manifest):
    """What was exported to ONNX, from which weights, with which tools, and its parity gate."""

    kind: ClassVar[str] = "export"

    variant: str
    onnx_file: str
    onnx_sha256: str
    onnx_bytes: int
    opset: int
    input: TensorSpec
    output: TensorSpec
    weights: dict
    versions: dict
    parity: ParityReport
    export_seconds: float
    peak_rss_mib: float
    created: str = field(default_factory=_now)
    # "tensor" (float32 NCHW) or "uint8" (the 8-bit NHWC crop, normalised by the model's first
    # nodes); manifests written before the uint8 models existed have none and are "tensor"
    input_kind: str = "tensor"


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile over the batch dimension: min <= opt <= max.

    ``opt`` is the batch size TensorRT tunes kernels for. Under Triton's dynamic batcher the
    batches that run most under load are the preferred sizes, so ``opt`` is the middle of
    them (see :meth:`for_max`); min is 1 so that a lone request never waits for company.
    """

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise EngineError(f"profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        if self.max > MAX_SUPPORTED_BATCH:
            raise EngineError(f"--max-batch {self.max} is above the supported {MAX_SUPPORTED_BATCH}")

    @classmethod
    def for_max(cls, max_batch: int) -> Profile:
        """min 1, opt = the largest power of two <= max/2 (at least 1), max as given."""
        if max_batch < 1:
            raise EngineError(f"--max-batch must be at least 1, got {max_batch}")
        opt = 1
        while opt * 2 <= max_batch // 2:
            opt *= 2
        return cls(1, max(1, min(opt, max_batch)), max_batch)

    def shapes(self, dims: tuple[int, ...] = (CHANNELS, CROP_SIZE, CROP_SIZE)) -> dict[str, tuple[int, ...]]:
        """min/opt/max input shapes: the batch size, then ``dims``, the ONNX input's other dimensions
        (NCHW ``(3, 224, 224)`` for the tensor models, NHWC ``(224, 224, 3)`` for the uint8 ones)."""
        if not dims or any(d <= 0 for d in dims):
            raise EngineError(f"a profile needs the input's fixed dimensions after the batch, got {dims}")
        return {k: (getattr(self, k), *dims) for k in ("min", "opt", "max")}


@dataclass(frozen=True)
class PlanManifest(Manifest):
    """What a TensorRT plan was built from, for which GPU and TensorRT, and its parity gate."""

    kind: ClassVar[str] = "plan"

    variant: str
    plan_file: str
    precision: str
    profile: Profile
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", as Triton's cc_model_filenames keys it
    onnx_sha256: str
    parity: ParityReport
    created: str = field(default_factory=_now)
    input_kind: str = "tensor"  # as in ExportManifest; older manifests have none and are "tensor"
