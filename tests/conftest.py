from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Downloads and unpacked models go to a cache of this test session, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HRNET_TRITON_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.delenv("HRNET_TRITON_WEIGHTS_MIRROR", raising=False)
    yield
    mp.undo()


@dataclass(frozen=True)
class Exported:
    onnx: Path
    manifest: dict
    paddle_dir: Path


@pytest.fixture(scope="session")
def w18_offline(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """HRNet_W18_C exported once per session with offline weights (about a minute on 2 cores)."""
    from hrnet_build.export import export_onnx, manifest_path
    from hrnet_build.weights import WeightsSpec
    from hrnet_triton import variants

    out = tmp_path_factory.mktemp("w18") / "HRNet_W18_C.onnx"
    paddle_dir = out.parent / "paddle"
    export_onnx(variants.get("HRNet_W18_C"), WeightsSpec.parse("offline"), out, paddle_model_dir=paddle_dir, progress=False)
    return Exported(out, json.loads(manifest_path(out).read_text()), paddle_dir)
