"""Every seed variant exports and passes the parity gate (slow: about 13 minutes on 2 cores).

Run with ``make test PYTEST_ARGS="-m slow"``. The figures of a full run are in docs/export.md
(from benchmarks/export_variants.py, which runs the same exports one process each).
"""

from __future__ import annotations

import onnx
import pytest

from hrnet_build.export import export_onnx
from hrnet_build.weights import WeightsSpec
from hrnet_core import variants


@pytest.mark.slow
@pytest.mark.parametrize("name", variants.names())
def test_every_variant_exports_and_passes_the_gate(name, tmp_path):
    out = tmp_path / f"{name}.onnx"
    manifest = export_onnx(variants.get(name), WeightsSpec.parse("offline"), out, progress=False)
    assert manifest.parity.max_abs_diff <= 1e-5 and manifest.parity.top5_identical
    assert manifest.parity.max_top1_prob < 0.999
    model = onnx.load(str(out), load_external_data=False)
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [
        "batch",
        3,
        224,
        224,
    ]
