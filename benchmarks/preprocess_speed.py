"""Client preprocessing speed against PaddleClas's own deploy pipeline, on the same images.

PaddleClas's pipeline is run as ``deploy/python/predict_cls.py`` runs it: ``cv2.imread``, BGR ->
RGB, then the operators of ``deploy/configs/inference_cls.yaml`` from the ``paddleclas`` wheel,
one image after another. Ours is ``hrnet_core.preprocess``: ``load_tensor`` one image after
another, and ``load_tensors`` (what ``classify`` uses) on its thread pool. Every tensor is first
checked to be bit-identical to PaddleClas's. Each figure is the median of ``--rounds`` passes
over ``--repeat`` copies of the image list, after one warm-up pass.

    python benchmarks/preprocess_speed.py              # the 7 bundled photographs
    python benchmarks/preprocess_speed.py photos/*.jpg
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

import numpy as np


def load_deploy_preprocess() -> list:
    """PaddleClas's ``deploy/python/preprocess.py`` operators for ``deploy/configs/inference_cls.yaml``.

    The ``paddleclas`` wheel's package ``__init__`` imports most of PaddleClas (scikit-learn, faiss, ...),
    so the packages on the module's import path are registered as bare modules pointing at the wheel's
    folders; every file that runs is PaddleClas's own (as in tests/paddleclas_reference.py).
    """
    import yaml

    spec = importlib.util.find_spec("paddleclas")
    if spec is None or spec.origin is None:
        sys.exit("the paddleclas wheel (the reference) is not installed: pip install --no-deps paddleclas==2.6.0")
    root = Path(spec.origin).parent
    for name in ("paddleclas", "paddleclas.deploy", "paddleclas.deploy.python"):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = pkg
    module = importlib.import_module("paddleclas.deploy.python.preprocess")
    config = yaml.safe_load((root / "deploy" / "configs" / "inference_cls.yaml").read_text())
    return module.create_operators(config["PreProcess"]["transform_ops"])


def rate(run: Callable[[], object], images: int, rounds: int) -> float:
    run()  # warm-up: file cache, OpenCV's thread pool, the normalisation tables
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="*", type=Path, help="image files (default: the bundled sample photographs)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the image list per pass (default: 4)")
    ap.add_argument("--workers", type=int, help="threads for load_tensors (default: its own, one per core up to 8)")
    args = ap.parse_args(argv)

    import cv2

    from hrnet_core.preprocess import default_workers, load_tensor, load_tensors
    from hrnet_core.samples import sample_images

    paths = [str(p) for p in (args.images or sample_images())] * args.repeat
    ops = load_deploy_preprocess()

    def paddleclas(path: str) -> np.ndarray:
        img = cv2.imread(path)[:, :, ::-1]
        for op in ops:
            img = op(img)
        return img

    for path in set(paths):
        if not np.array_equal(load_tensor(path), paddleclas(path)):
            raise SystemExit(f"{path}: our tensor differs from PaddleClas's; not benchmarking a different answer")

    workers = args.workers or default_workers()
    rows = [
        (
            "PaddleClas deploy pipeline, one image at a time",
            rate(lambda: [paddleclas(p) for p in paths], len(paths), args.rounds),
        ),
        (
            "hrnet_core load_tensor, one image at a time",
            rate(lambda: [load_tensor(p) for p in paths], len(paths), args.rounds),
        ),
        (
            f"hrnet_core load_tensors, {workers} threads (classify's path)",
            rate(lambda: load_tensors(paths, workers=workers), len(paths), args.rounds),
        ),
    ]
    base = rows[0][1]
    print(
        f"{len(set(paths))} images x {args.repeat}, median of {args.rounds} passes; {date.today()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), numpy {np.__version__}\n"
    )
    print("| pipeline | images/s | vs PaddleClas |\n|---|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r:.0f} | {r / base:.2f}x |")


if __name__ == "__main__":
    main()
