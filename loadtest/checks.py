"""The checks every answer of the load test passes: a wrong answer is a failure, like an error."""

from __future__ import annotations

import numpy as np

from hrnet_core.contract import NUM_CLASSES


def check_probabilities(probs: np.ndarray | None, batch: int) -> None:
    """Full probabilities: shape (batch, 1000) and a probability distribution per row. (Any top-1 index of
    such a row is in the label set, so there is nothing more to check about it.)"""
    if probs is None or probs.shape != (batch, NUM_CLASSES):
        raise AssertionError(
            f"expected probabilities of shape ({batch}, {NUM_CLASSES}), got {getattr(probs, 'shape', None)}"
        )
    if not np.isfinite(probs).all() or probs.min() < 0 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise AssertionError("the answer is not a probability distribution per image")


def check_classification(entries: np.ndarray | None, batch: int, k: int) -> None:
    """Server-side top-k ("value:class:label" entries): classes in the label set, probabilities descending."""
    if entries is None or entries.shape != (batch, k):
        raise AssertionError(f"expected ({batch}, {k}) classification entries, got {getattr(entries, 'shape', None)}")
    for row in entries:
        probs = []
        for entry in row:
            value, class_id, label = (entry.decode().split(":", 2) + [""])[:3]
            if not 0 <= int(class_id) < NUM_CLASSES or not label:
                raise AssertionError(f"class {class_id!r} ({label!r}) outside the label set")
            probs.append(float(value))
        if probs != sorted(probs, reverse=True) or not 0 <= probs[-1] <= probs[0] <= 1:
            raise AssertionError(f"top-k probabilities out of order or range: {probs}")
