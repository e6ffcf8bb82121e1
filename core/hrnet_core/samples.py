"""Real photographs shipped inside a registry package: scikit-image's ``skimage/data`` files.

They are the project's sample and parity images, available offline on any machine with
``scikit-image`` installed (the ``export`` extra). Most are public domain or CC0; see
``skimage/data/README.txt`` for each one's source and licence.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hrnet_core.errors import HrnetTritonError

# Natural photographs (not synthetic patterns or microscopy): colour, and one grayscale.
# Sizes are width x height.
SAMPLE_FILES = (
    "astronaut.png",  # 512x512 RGB, portrait
    "chelsea.png",  # 451x300 RGB, a tabby cat
    "coffee.png",  # 600x400 RGB, a cup of coffee
    "rocket.jpg",  # 640x427 RGB JPEG, a launch
    "motorcycle_left.png",  # 741x500 RGB, a motorcycle
    "hubble_deep_field.jpg",  # 1000x872 RGB JPEG
    "camera.png",  # 512x512 grayscale, a cameraman
)


def sample_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise HrnetTritonError(
            "the sample photographs come from scikit-image, which is not installed; "
            "install it with `pip install scikit-image` (or the `export` extra)"
        )
    return Path(spec.origin).parent / "data"


def sample_images() -> list[Path]:
    """Paths of the bundled sample photographs, in a fixed order."""
    root = sample_dir()
    paths = [root / name for name in SAMPLE_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise HrnetTritonError(f"scikit-image at {root} lacks sample files {missing}; reinstall scikit-image")
    return paths
