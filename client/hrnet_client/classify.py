"""Top-k classification of image files, over any runtime.

:class:`Classifier` turns files into top-k :class:`Prediction` records: it preprocesses them
with the model's contract, runs them in batches and ranks the probabilities. Subclasses say how
probabilities are computed: :class:`RunnerClassifier` wraps any in-process
:class:`~hrnet_core.runtime.Runner` (``classify --onnx`` uses ONNX Runtime), and
:class:`hrnet_client.triton.TritonClassifier` asks a Triton server.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from hrnet_core.contract import DEFAULT_PREPROCESS, MAX_PIXELS, PreprocessConfig
from hrnet_core.errors import HrnetTritonError, ImageError
from hrnet_core.labels import Guess, Labels, imagenet_labels, top_k
from hrnet_core.preprocess import load_tensors
from hrnet_core.runtime import Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The top-k classes for one image, or the error that stopped it."""

    image: str
    top: tuple[Guess, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier:
    """Top-k classification of image files; subclasses implement :meth:`run`."""

    cfg: PreprocessConfig = DEFAULT_PREPROCESS
    max_batch: int = 8
    labels: Labels

    def run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release what the classifier holds (connections, threads); the base holds nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _probabilities_per_batch(self, batches: Sequence[np.ndarray]) -> Iterator[np.ndarray | HrnetTritonError]:
        for batch in batches:
            try:
                yield self.run(batch)
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
        for i, (p, tensor) in enumerate(
            zip(paths, load_tensors(paths, self.cfg, workers=workers, max_pixels=max_pixels))
        ):
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


class RunnerClassifier(Classifier):
    """Classify image files in-process with any :class:`~hrnet_core.runtime.Runner`."""

    def __init__(self, runner: Runner, *, cfg: PreprocessConfig = DEFAULT_PREPROCESS, max_batch: int = 64):
        self.runner, self.cfg, self.max_batch = runner, cfg, max_batch
        self.name = runner.name
        self.labels = imagenet_labels()
        meta = getattr(runner, "metadata", {})
        self.labels_meaningful = meta.get("labels_meaningful", "true") == "true"
        if not self.labels_meaningful:
            log.warning("the model was exported with OFFLINE weights: its labels are meaningless")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.run(batch)


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
