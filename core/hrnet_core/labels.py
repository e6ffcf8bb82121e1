"""Class labels and top-k: PaddleClas's ImageNet-1k label list, and ranking probabilities.

The label list is PaddleClas's ``ppcls/utils/imagenet1k_label_list.txt`` (``<id> <name>`` per
line), shipped as package data; the model repository's ``labels.txt`` files are written from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import numpy as np


@dataclass(frozen=True)
class Guess:
    """One class of a top-k answer."""

    class_id: int
    label: str
    probability: float


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Class ids by descending probability; ties go to the lower id, so the order is stable."""
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k]


@dataclass(frozen=True)
class Labels:
    """Class names indexed by class id."""

    names: tuple[str, ...] = field(repr=False)

    def __getitem__(self, class_id: int) -> str:
        return self.names[class_id]

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def parse(cls, text: str) -> Labels:
        """Parse PaddleClas's ``<id> <name>`` format; ids must be 0..N-1 in order."""
        names = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            idx, _, name = line.partition(" ")
            if not idx.isdigit() or int(idx) != len(names) or not name:
                raise ValueError(f"label list line {lineno}: expected '{len(names)} <name>', got {line!r}")
            names.append(name.strip())
        return cls(tuple(names))


def imagenet_labels() -> Labels:
    text = resources.files("hrnet_core").joinpath("data/imagenet1k_label_list.txt").read_text("utf-8")
    return Labels.parse(text)
