"""The ten seed HRNet variants: the single source of their facts in this project.

Rows, names and reference figures are those of table 1.2 in PaddleClas's
``docs/zh_CN/models/ImageNet1k/HRNet.md``. Weight
locations are PaddleClas's published ones: the dygraph pretrained ``.pdparams`` under
``dygraph/legendary_models/`` and the exported inference models under ``dygraph/inference/``.

``pretrained_sha256`` pins the SHA-256 of a row's ``.pdparams``; ``--weights auto`` checks the
download against it, and refuses a row without one unless ``--allow-unpinned-weights`` is given.
All ten are None: PaddleClas publishes no checksums, and the machine this table was written on
cannot reach PaddleClas's server, so no hash could be computed. To pin one, download the file
from ``pretrained_url`` on a trusted network, run ``sha256sum`` on it, and write the 64 hex
digits into the row (docs/export.md, "Pinned hashes").
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from hrnet_core.errors import UnknownVariantError

PADDLE_MODELS_BASE = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph"


class Flavour(str, enum.Enum):
    """How PaddleClas trained the published weights."""

    STANDARD = "standard"
    SSLD = "ssld"  # Simple Semi-supervised Label Distillation


@dataclass(frozen=True)
class Variant:
    """One row of the seed's table 1.2."""

    name: str
    width: int
    has_se: bool
    flavour: Flavour
    top1: float
    top5: float
    ref_top1: float | None
    ref_top5: float | None
    flops_g: float
    params_m: float
    pretrained_sha256: str | None = None  # of the .pdparams at pretrained_url; None: not pinned yet

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"{self.name}: width must be positive, got {self.width}")
        if self.pretrained_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.pretrained_sha256):
            raise ValueError(f"{self.name}: pretrained_sha256 must be 64 lowercase hex digits (sha256sum's output)")
        suffix = "_ssld" if self.flavour is Flavour.SSLD else ""
        expected = f"{'SE_' if self.has_se else ''}HRNet_W{self.width}_C{suffix}"
        if self.name != expected:
            raise ValueError(f"variant name {self.name!r} does not match its facts ({expected!r})")

    @property
    def arch(self) -> str:
        """The PaddleClas architecture name (the name without the weights flavour)."""
        return self.name.removesuffix("_ssld")

    @property
    def pretrained_url(self) -> str:
        return f"{PADDLE_MODELS_BASE}/legendary_models/{self.name}_pretrained.pdparams"

    @property
    def inference_url(self) -> str:
        return f"{PADDLE_MODELS_BASE}/inference/{self.name}_infer.tar"


_S, _D = Flavour.STANDARD, Flavour.SSLD

VARIANTS: tuple[Variant, ...] = (
    #       name                   width  SE     flavour top1   top5   ref1   ref5   GFLOPs  Mparams
    Variant("HRNet_W18_C",          18, False, _S, 0.769, 0.934, 0.768, 0.934, 4.140, 21.290),
    Variant("HRNet_W18_C_ssld",     18, False, _D, 0.816, 0.958, 0.768, 0.934, 4.140, 21.290),
    Variant("HRNet_W30_C",          30, False, _S, 0.780, 0.940, 0.782, 0.942, 16.230, 37.710),
    Variant("HRNet_W32_C",          32, False, _S, 0.783, 0.942, 0.785, 0.942, 17.860, 41.230),
    Variant("HRNet_W40_C",          40, False, _S, 0.788, 0.945, 0.789, 0.945, 25.410, 57.550),
    Variant("HRNet_W44_C",          44, False, _S, 0.790, 0.945, 0.789, 0.944, 29.790, 67.060),
    Variant("HRNet_W48_C",          48, False, _S, 0.790, 0.944, 0.793, 0.945, 34.580, 77.470),
    Variant("HRNet_W48_C_ssld",     48, False, _D, 0.836, 0.968, 0.793, 0.945, 34.580, 77.470),
    Variant("HRNet_W64_C",          64, False, _S, 0.793, 0.946, 0.795, 0.946, 57.830, 128.060),
    Variant("SE_HRNet_W64_C_ssld",  64, True,  _D, 0.847, 0.973, None,  None,  57.830, 128.970),
)  # fmt: skip

_BY_NAME = {v.name: v for v in VARIANTS}


def names() -> list[str]:
    return [v.name for v in VARIANTS]


def get(name: str) -> Variant:
    """Look a variant up by its exact seed name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        close = [n for n in _BY_NAME if n.lower() == name.lower()]
        hint = f" Did you mean {close[0]}?" if close else ""
        raise UnknownVariantError(
            f"unknown model {name!r}.{hint} The seed variants are: {', '.join(_BY_NAME)} (run `hrnet-triton variants`)."
        ) from None
