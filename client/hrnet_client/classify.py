"""Top-k classification of image files, over any runtime.

:class:`Classifier` turns files into top-k :class:`Prediction` records: it preprocesses them
with the model's contract, runs them in batches and ranks the probabilities. Subclasses say how
probabilities are computed: :class:`RunnerClassifier` wraps any in-process
:class:`~hrnet_core.runtime.Runner` (``classify --onnx`` uses ONNX Runtime), and
:class:`hrnet_client.triton.TritonClassifier` asks a Triton server.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import TextIO

import numpy as np

from hrnet_core.contract import DEFAULT_PREPROCESS, MAX_PIXELS, PreprocessConfig
from hrnet_core.errors import HrnetTritonError, ImageError
from hrnet_core.labels import Guess, Labels, imagenet_labels, top_k
from hrnet_core.preprocess import default_workers, try_load_tensor
from hrnet_core.runtime import Runner

from .inputs import loader

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
    concurrency: int = 1  # batches in flight at once
    labels: Labels

    def run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release what the classifier holds (connections, threads); the base holds nothing."""

    def _loader(self, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None):
        """A function: an image file -> what :meth:`run` takes for it (or its :class:`ImageError`).
        The base makes PaddleClas's float32 tensors."""
        return functools.partial(try_load_tensor, cfg=self.cfg, max_pixels=max_pixels, max_bytes=max_bytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, batch: np.ndarray, k: int | None) -> Future:
        """Start one batch; its future answers the probabilities (a subclass whose server ranks
        may answer the top-k rows for ``k``) or fails with a :class:`HrnetTritonError`. The base
        runs :meth:`run` here and now."""
        future: Future = Future()
        try:
            future.set_result(self.run(batch))
        except HrnetTritonError as err:
            future.set_exception(err)
        return future

    def iter_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        k: int = 5,
        batch_size: int = 8,
        *,
        workers: int | None = None,
        max_pixels: int = MAX_PIXELS,
        max_bytes: int | None = None,
    ) -> Iterator[Prediction]:
        """A :class:`Prediction` per file, in input order, each as soon as it and those before it
        are known. Memory stays bounded however many files there are: ``paths`` is read lazily,
        and at most ``2 × concurrency`` batches (of ``batch_size`` tensors) are between
        preprocessing and their answer. A file that cannot be used, or a batch that failed,
        gets its error; everything else is still classified."""
        batch_size = max(1, min(batch_size, self.max_batch))
        window = 2 * max(1, self.concurrency)
        load = self._loader(max_pixels, max_bytes)
        chunks = _chunked(paths, batch_size)
        loading: deque[_Chunk] = deque()  # tensors being made, in order
        running: deque[_Chunk] = deque()  # batches sent, in order
        pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="preprocess")
        try:
            while True:
                while len(loading) + len(running) < window and (chunk := next(chunks, None)):
                    loading.append(_Chunk(chunk, [pool.submit(load, p) for p in chunk]))
                self._send_loaded(loading, running, k, block=not running)
                if not running:
                    return
                head = running[0]
                while not head.outcome.done() and loading:  # keep the lanes fed while waiting
                    pending = [f for f in loading[0].loads if not f.done()]
                    wait([head.outcome, *pending], return_when=FIRST_COMPLETED)
                    self._send_loaded(loading, running, k, block=False)
                yield from running.popleft().predictions(self.labels, k)
        finally:
            for chunk in (*loading, *running):
                chunk.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _send_loaded(self, loading: deque[_Chunk], running: deque[_Chunk], k: int, *, block: bool) -> None:
        """Send the batch of each leading chunk whose files are loaded (with ``block``, wait for the first)."""
        while loading and (block or loading[0].loaded()):
            chunk = loading.popleft()
            batch = chunk.batch()
            chunk.outcome = self._submit(batch, k) if batch is not None else _done([])
            running.append(chunk)
            block = False

    def classify_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        k: int = 5,
        batch_size: int = 8,
        *,
        workers: int | None = None,
        max_pixels: int = MAX_PIXELS,
        max_bytes: int | None = None,
    ) -> list[Prediction]:
        """:meth:`iter_files` as a list: for a few files (they are all held at once)."""
        return list(self.iter_files(paths, k, batch_size, workers=workers, max_pixels=max_pixels, max_bytes=max_bytes))


def _done(result) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _chunked(paths: Iterable[str | os.PathLike[str]], size: int) -> Iterator[list[str]]:
    it = iter(paths)
    while chunk := [str(p) for p in itertools.islice(it, size)]:
        yield chunk


def _rank(probs: np.ndarray, labels: Labels, k: int) -> list[tuple[Guess, ...]]:
    return [tuple(Guess(int(c), labels[int(c)], float(row[c])) for c in top_k(row, k)) for row in probs]


@dataclass
class _Chunk:
    """Consecutive input files: their tensors being made, then their batch being classified."""

    paths: list[str]
    loads: list[Future]  # each answers a tensor or an ImageError
    outcome: Future | None = None  # the batch's probabilities (or top-k rows), once sent
    errors: dict[int, str] = field(default_factory=dict)

    def loaded(self) -> bool:
        return all(f.done() for f in self.loads)

    def batch(self) -> np.ndarray | None:
        """The loaded tensors stacked (the files that failed noted in ``errors``); None if none loaded."""
        tensors = []
        for i, future in enumerate(self.loads):
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - not an ImageError, yet still this file's own error
                result = ImageError(f"{self.paths[i]}: cannot be preprocessed ({type(err).__name__}: {err})")
            if isinstance(result, ImageError):
                self.errors[i] = str(result)
            else:
                tensors.append(result)
        self.loads = []  # the stacked batch is all that is kept
        return np.stack(tensors) if tensors else None

    def cancel(self) -> None:
        for future in (*self.loads, *([self.outcome] if self.outcome else [])):
            future.cancel()

    def predictions(self, labels: Labels, k: int) -> Iterator[Prediction]:
        try:
            outcome = self.outcome.result() if self.outcome else []
        except HrnetTritonError as err:
            outcome = err
        if isinstance(outcome, np.ndarray):
            outcome = _rank(outcome, labels, k)
        rows = iter(outcome if isinstance(outcome, list) else ())
        for i, path in enumerate(self.paths):
            if i in self.errors:
                yield Prediction(path, error=self.errors[i])
            elif isinstance(outcome, HrnetTritonError):
                yield Prediction(path, error=str(outcome))
            else:  # a row: ranked, probabilities (a batch answered image by image), or that image's own error
                row = next(rows)
                if isinstance(row, HrnetTritonError):  # the server refused this image: named, as a local error is
                    yield Prediction(path, error=f"{path}: {row}")
                else:
                    yield Prediction(path, _rank(row[np.newaxis], labels, k)[0] if isinstance(row, np.ndarray) else row)


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

    def _loader(self, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None):
        if getattr(self.runner, "input_dtype", None) == np.uint8:  # a uint8 model: it takes the crops
            return loader("uint8", self.cfg, max_pixels, max_bytes)
        return super()._loader(max_pixels, max_bytes)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.run(batch)


def read_paths(source: str | os.PathLike[str]) -> Iterator[str]:
    """The image paths listed in the file ``source`` (``-``: standard input), one per line, read
    lazily, so a list of millions costs no memory; blank lines are skipped."""
    if str(source) == "-":
        return _lines(sys.stdin, close=False)
    try:
        return _lines(open(source, encoding="utf-8"), close=True)
    except OSError as err:
        raise HrnetTritonError(
            f"--files-from {source}: cannot read the list ({err.strerror or err}); give a file of paths, one a line"
        ) from err


def _lines(fh: TextIO, *, close: bool) -> Iterator[str]:
    with fh if close else contextlib.nullcontext(fh):
        for line in fh:
            if line.strip():
                yield line.removesuffix("\n")


def write_predictions(preds: Iterable[Prediction], out: TextIO, as_json: bool = False) -> tuple[int, int]:
    """Write each prediction as it comes, flushed; returns (written, failed).

    Text is :func:`format_predictions`'s. JSON is one array, streamed one element per line:
    ``[``, the first object, each further one after a comma (``,{...}``), ``]``. It parses as
    one document, and a reader that wants each prediction at once reads it line by line.
    """
    written = failed = 0
    if as_json:
        out.write("[\n")
    for p in preds:
        if as_json:
            out.write(("," if written else "") + json.dumps(p.to_dict()) + "\n")
        else:
            out.write(format_predictions([p]) + "\n")
        out.flush()
        written, failed = written + 1, failed + bool(p.error)
    if as_json:
        out.write("]\n")
        out.flush()
    return written, failed


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
