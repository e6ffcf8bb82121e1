"""The CPU runtimes' parity gate: OpenVINO, at the precision it will serve, against ONNX Runtime.

`hrnet-triton repo --target cpu|onnx` runs it on every model it installs with the openvino
runtime, before writing that model: the seven sample photographs (``hrnet_core.samples``)
through ONNX Runtime at FP32 (the reference every stage is gated against) and through OpenVINO
as the server will run it. Like the TensorRT FP16 gate, BF16 must keep the same top-1 on every
photograph and at least four of the top five; its probability drift is reported, not bounded
(BF16 keeps 8 bits of mantissa: docs/cpu-speed.md measured how far it moves). FP32 OpenVINO
must stay within the float32 noise floor docs/export.md measured between float32 runtimes.

The report's one-line summary is written into the model's config (parameter ``parity``), so a
server's metadata says what its model was checked against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hrnet_core.errors import HrnetTritonError
from hrnet_core.parity import ParityLimits, ParityReport, compare, parity_batch
from hrnet_core.runtime import OPENVINO, OnnxRuntimeRunner, cpu_runner
from hrnet_core.samples import sample_images

PARITY_PARAMETER = "parity"

LIMITS = {
    # docs/export.md: float32 runtimes on the same network differ by up to 2.4e-5 in probability
    # (its noise-floor table); OpenVINO FP32 stays well inside it on the photographs.
    "fp32": ParityLimits(max_abs_dprob=3e-5, top1_identical=True, min_top5_overlap=5),
    # The TensorRT FP16 gate's ranks. The drift itself is reported: 1.0 bounds no probability.
    "bf16": ParityLimits(max_abs_dprob=1.0, top1_identical=True, min_top5_overlap=4),
}


def gate(
    onnx: str | os.PathLike[str],
    precision: str,
    *,
    input_kind: str = "tensor",
    threads: int = 0,
    photos: Sequence[Path] | None = None,
) -> ParityReport:
    """OpenVINO at ``precision`` against ONNX Runtime FP32 on the photographs; raises
    :class:`~hrnet_core.errors.ParityError` (naming the failing photographs) unless it passes."""
    if precision not in LIMITS:
        raise HrnetTritonError(f"OpenVINO serves at {', '.join(LIMITS)}, not {precision}")
    photos = list(photos or sample_images())
    batch = parity_batch(photos, input_kind)
    reference = OnnxRuntimeRunner(onnx, threads=threads).run(batch)
    candidate = cpu_runner(onnx, OPENVINO, threads=threads, precision=precision).run(batch)
    import onnxruntime
    import openvino

    report = compare(
        reference,
        candidate,
        LIMITS[precision],
        images=[Path(p).name for p in photos],
        reference_name=f"ONNX Runtime {onnxruntime.__version__} fp32",
        # the OpenVINO of this environment: a server's own OpenVINO (the NGC openvino backend) may differ
        candidate_name=f"OpenVINO {openvino.__version__.split('-')[0]} {precision}",
    )
    return report.require(f"the {precision} model {Path(onnx).name}")
