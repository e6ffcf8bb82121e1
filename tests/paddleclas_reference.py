"""Load PaddleClas's own HRNet module from the ``paddleclas`` wheel, as a test-only reference.

The wheel's package ``__init__`` files import most of PaddleClas (scikit-learn, faiss, …), which
this project does not install. The HRNet module itself needs only Paddle and three small
PaddleClas modules, so the packages on its import path are registered as bare modules that
point at the wheel's real folders; every file that runs is PaddleClas's own, unmodified.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

PACKAGES = (
    "ppcls",
    "ppcls.arch",
    "ppcls.arch.backbone",
    "ppcls.arch.backbone.base",
    "ppcls.arch.backbone.legendary_models",
    "ppcls.utils",
)


@functools.lru_cache(maxsize=1)
def paddleclas_root() -> Path:
    """The wheel's folder, found once (before any bare package module is registered)."""
    spec = importlib.util.find_spec("paddleclas")
    if spec is None or spec.origin is None:
        pytest.skip(
            "the paddleclas wheel (test-only reference) is not installed: pip install --no-deps paddleclas==2.6.0"
        )
    return Path(spec.origin).parent


def load_hrnet_module():
    """PaddleClas 2.6.0's ``ppcls/arch/backbone/legendary_models/hrnet.py``."""
    root = paddleclas_root()
    for name in PACKAGES:
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root.joinpath(*name.split(".")))]
            sys.modules[name] = pkg
    importlib.import_module("ppcls.utils.logger").init_logger()
    return importlib.import_module("ppcls.arch.backbone.legendary_models.hrnet")


def load_deploy_preprocess():
    """PaddleClas's ``deploy/python/preprocess.py`` and its ``deploy/configs/inference_cls.yaml`` ops."""
    import yaml

    root = paddleclas_root()
    for name in ("paddleclas", "paddleclas.deploy", "paddleclas.deploy.python"):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = pkg
    module = importlib.import_module("paddleclas.deploy.python.preprocess")
    config = yaml.safe_load((root / "deploy" / "configs" / "inference_cls.yaml").read_text())
    return module.create_operators(config["PreProcess"]["transform_ops"])


def paddleclas_deploy_tensor(path):
    """The tensor PaddleClas's deploy predictor feeds its model for one image file (CHW float32):
    ``cv2.imread`` then BGR -> RGB, as ``predict_cls.py`` does, then the config's operators."""
    import cv2

    img = cv2.imread(str(path))[:, :, ::-1]
    for op in load_deploy_preprocess():
        img = op(img)
    return img


def build_reference(width: int, has_se: bool):
    """PaddleClas's HRNet class for any width (its SE_HRNet_W64_C() factory raises KeyError)."""
    module = load_hrnet_module()
    return module.HRNet(stages_pattern=module.MODEL_STAGES_PATTERN["HRNet"], width=width, has_se=has_se)
