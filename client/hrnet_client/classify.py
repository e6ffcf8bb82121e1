"""Top-k classification results, and an in-process ONNX Runtime classifier.

The in-process classifier runs an exported ONNX model without a server: the reference that
served results are compared with, and the main job's path before a server is started.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hrnet_triton.contract import DEFAULT_PREPROCESS, INPUT_NAME, OUTPUT_NAME, Labels, PreprocessConfig, imagenet_labels
from hrnet_triton.errors import HrnetTritonError, ImageError

from .preprocess import preprocess, read_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guess:
    class_id: int
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The top-k classes for one image, or the error that stopped it."""

    image: str
    top: tuple[Guess, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Class ids by descending probability; ties go to the lower id, so the order is stable."""
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k]


def predictions(names: Sequence[str], probs: np.ndarray, labels: Labels, k: int) -> list[Prediction]:
    return [
        Prediction(name, tuple(Guess(int(c), labels[int(c)], float(row[c])) for c in top_k(row, k)))
        for name, row in zip(names, probs)
    ]


class Classifier:
    """Top-k classification of image files; subclasses say how probabilities are computed."""

    cfg: PreprocessConfig = DEFAULT_PREPROCESS
    max_batch: int = 8
    labels: Labels

    def probabilities(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def classify_files(self, paths: Sequence[str | os.PathLike[str]], k: int = 5, batch_size: int = 8) -> list[Prediction]:
        """Classify every file; a file that cannot be read gets an error entry, the others still run."""
        batch_size = max(1, min(batch_size, self.max_batch))
        results: dict[int, Prediction] = {}
        good: list[tuple[int, np.ndarray]] = []
        for i, p in enumerate(paths):
            try:
                good.append((i, preprocess(read_image(p), self.cfg)))
            except ImageError as err:
                results[i] = Prediction(str(p), error=str(err))
        for start in range(0, len(good), batch_size):
            chunk = good[start : start + batch_size]
            probs = self.probabilities(np.stack([t for _, t in chunk]))
            for (i, _), pred in zip(chunk, predictions([str(paths[i]) for i, _ in chunk], probs, self.labels, k)):
                results[i] = pred
        return [results[i] for i in range(len(paths))]


class OnnxRuntimeClassifier(Classifier):
    """Classify image files in-process with an exported model."""

    def __init__(self, onnx_path: str | os.PathLike[str], cfg: PreprocessConfig = DEFAULT_PREPROCESS, threads: int = 0):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise HrnetTritonError(f"{path}: no such ONNX model; create it with `hrnet-triton export`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.cfg = cfg
        self.max_batch = 64
        self.labels = imagenet_labels()
        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels_meaningful = meta.get("labels_meaningful", "true") == "true"
        if not self.labels_meaningful:
            log.warning("%s was exported with OFFLINE weights: its labels are meaningless", path.name)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def format_predictions(preds: Sequence[Prediction], as_json: bool = False) -> str:
    if as_json:
        return json.dumps([p.to_dict() for p in preds], indent=2)
    lines = []
    for p in preds:
        lines.append(p.image)
        if p.error:
            lines.append(f"  error: {p.error}")
        for g in p.top:
            lines.append(f"  {g.probability:7.4f}  {g.class_id:4d}  {g.label}")
    return "\n".join(lines)
