"""Top-k classification results, and an in-process ONNX Runtime classifier.

The in-process classifier runs an exported ONNX model without a server: the reference that
served results are compared with, and the main job's path before a server is started.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hrnet_triton.contract import DEFAULT_PREPROCESS, INPUT_NAME, OUTPUT_NAME, Labels, PreprocessConfig, imagenet_labels
from hrnet_triton.errors import HrnetTritonError, ImageError

from .preprocess import MAX_PIXELS, load_tensors

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


class Classifier:
    """Top-k classification of image files; subclasses say how probabilities are computed."""

    cfg: PreprocessConfig = DEFAULT_PREPROCESS
    max_batch: int = 8
    labels: Labels

    def probabilities(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _probabilities_per_batch(self, batches: Sequence[np.ndarray]) -> Iterator[np.ndarray | HrnetTritonError]:
        for batch in batches:
            try:
                yield self.probabilities(batch)
            except HrnetTritonError as err:
                yield err

    def classify_batches(
        self, batches: Sequence[np.ndarray], k: int
    ) -> Iterator[list[tuple[Guess, ...]] | HrnetTritonError]:
        """Top-k per image of each batch, in order; a batch that failed yields its error."""
        for probs in self._probabilities_per_batch(batches):
            if isinstance(probs, HrnetTritonError):
                yield probs
            else:
                yield [tuple(Guess(int(c), self.labels[int(c)], float(row[c])) for c in top_k(row, k)) for row in probs]

    def classify_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        k: int = 5,
        batch_size: int = 8,
        *,
        workers: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> list[Prediction]:
        """Classify every file. A file that cannot be used, or a batch the server refused, gets an
        error entry; everything else is still classified."""
        batch_size = max(1, min(batch_size, self.max_batch))
        results: dict[int, Prediction] = {}
        good: list[tuple[int, np.ndarray]] = []
        for i, (p, tensor) in enumerate(zip(paths, load_tensors(paths, self.cfg, workers=workers, max_pixels=max_pixels))):
            if isinstance(tensor, ImageError):
                results[i] = Prediction(str(p), error=str(tensor))
            else:
                good.append((i, tensor))
        chunks = [good[s : s + batch_size] for s in range(0, len(good), batch_size)]
        outcomes = self.classify_batches([np.stack([t for _, t in chunk]) for chunk in chunks], k)
        for chunk, outcome in zip(chunks, outcomes):
            for j, (i, _) in enumerate(chunk):
                if isinstance(outcome, HrnetTritonError):
                    results[i] = Prediction(str(paths[i]), error=str(outcome))
                else:
                    results[i] = Prediction(str(paths[i]), outcome[j])
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
