"""One parity comparison for every gate: a candidate runtime's probabilities against a reference's.

The export stage compares ONNX Runtime with Paddle Inference, the engine stage TensorRT with
ONNX Runtime, tests a Triton server with ONNX Runtime. Each passes its own :class:`ParityLimits`
to :func:`compare`, which measures the figures every gate reports and names the images that fail.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hrnet_core.contract import NUM_CLASSES
from hrnet_core.errors import ParityError
from hrnet_core.labels import top_k
from hrnet_core.preprocess import load_crop, preprocess_files

TOP_K = 5


@dataclass(frozen=True)
class ParityLimits:
    """What a candidate must reproduce of the reference on every image."""

    max_abs_dprob: float  # largest allowed |Δprobability| over all images and classes
    top1_identical: bool = True
    min_top5_overlap: int = TOP_K  # classes the two top-5 sets share, per image
    top5_same_order: bool = False  # the top-5 must be the same classes in the same order

    def __post_init__(self) -> None:
        if not 0 <= self.min_top5_overlap <= TOP_K or self.max_abs_dprob < 0:
            raise ValueError(f"parity limits out of range: {self}")


@dataclass(frozen=True)
class ParityReport:
    """What one comparison measured, and against which limits."""

    reference: str
    candidate: str
    images: tuple[str, ...]
    max_abs_dprob: float
    top1_agree: int  # images whose top-1 class is the same
    min_top5_overlap: int
    top5_identical: bool  # same top-5 in the same order on every image
    min_top1_prob: float  # of the candidate: shows whether the softmax is saturated
    max_top1_prob: float
    limits: ParityLimits
    failing_images: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failing_images and self.max_abs_dprob <= self.limits.max_abs_dprob

    def summary(self) -> str:
        return (
            f"{self.candidate} vs {self.reference} on {len(self.images)} photographs: max |Δprob| "
            f"{self.max_abs_dprob:.2e} (limit {self.limits.max_abs_dprob:.0e}), top-1 agrees on "
            f"{self.top1_agree}/{len(self.images)}, top-5 overlap >= {self.min_top5_overlap}/{TOP_K}"
            f"{', same order' if self.top5_identical else ''}"
        )

    def require(self, what_was_not_written: str) -> ParityReport:
        """Raise :class:`ParityError` unless the report passed; return it otherwise."""
        if not self.passed:
            raise ParityError(
                f"parity gate failed: {self.summary()}; failing on {list(self.failing_images) or 'no single image'}. "
                f"{what_was_not_written} was not written"
            )
        return self


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    limits: ParityLimits,
    *,
    images: Sequence[str],
    reference_name: str,
    candidate_name: str,
) -> ParityReport:
    """Measure ``candidate`` against ``reference`` (both (N, classes) probabilities) on ``images``."""
    if reference.shape != candidate.shape or reference.shape != (len(images), NUM_CLASSES):
        raise ParityError(
            f"output shapes differ: {reference_name} {reference.shape}, {candidate_name} {candidate.shape} "
            f"(expected ({len(images)}, {NUM_CLASSES}))"
        )
    ref5, cand5 = top_k(reference, TOP_K), top_k(candidate, TOP_K)
    overlap = [len(set(r) & set(c)) for r, c in zip(ref5, cand5)]
    top1 = [bool(r[0] == c[0]) for r, c in zip(ref5, cand5)]
    same_order = [bool(np.array_equal(r, c)) for r, c in zip(ref5, cand5)]
    failing = tuple(
        name
        for name, t1, o, s in zip(images, top1, overlap, same_order)
        if (limits.top1_identical and not t1) or o < limits.min_top5_overlap or (limits.top5_same_order and not s)
    )
    best = candidate.max(axis=1)
    return ParityReport(
        reference=reference_name,
        candidate=candidate_name,
        images=tuple(images),
        max_abs_dprob=float(np.abs(reference.astype(np.float64) - candidate).max()),
        top1_agree=sum(top1),
        min_top5_overlap=min(overlap),
        top5_identical=all(same_order),
        min_top1_prob=float(best.min()),
        max_top1_prob=float(best.max()),
        limits=limits,
        failing_images=failing,
    )


def parity_batch(photos: Sequence[str | os.PathLike[str]], input_kind: str) -> np.ndarray:
    """A gate's input: the photographs as float32 NCHW tensors, or as the uint8 NHWC crops for a
    model of the uint8 kind (its reference is ONNX Runtime on the same uint8 ONNX, fed the same crops)."""
    if input_kind == "uint8":
        return np.stack([load_crop(p) for p in photos])
    return preprocess_files(photos)
