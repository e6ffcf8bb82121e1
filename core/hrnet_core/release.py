"""The one Triton release this project targets: the only place its versions are written.

TensorRT plans only load in the TensorRT version they were built with, so the serving
container (``tritonserver``) and the container that builds plans (``tensorrt``) must be the
same NGC release, and the local CPU server (the ``tritonserver`` binary in the ``nvidia-pytriton``
wheel) is the same Triton version. Everything else reads these values:

- Python code imports this module;
- the Makefile runs this file (``python3 core/hrnet_core/release.py pytriton``) to install the wheel;
- the Dockerfile takes ``NGC_RELEASE`` as a build argument, and k8s/ names the images in
  Kustomize ``images:``; ``tests/test_release.py`` fails when either disagrees with this file.

24.10 is Triton 2.51.0, the same server as the binary in ``nvidia-pytriton`` 0.7.0, and its
TensorRT 10.5 builds plans for compute capability 7.0 and up, which covers both GPUs of
PaddleClas's benchmark table (V100 is 7.0, T4 is 7.5). Change ``NGC_RELEASE`` and the facts
beside it (NVIDIA's Frameworks Support Matrix) to move the whole project to another release.
"""

from __future__ import annotations

import sys

NGC_RELEASE = "24.10"
TRITON_VERSION = "2.51.0"
TENSORRT_VERSION = "10.5.0.18"  # the 24.10 containers' TensorRT (with CUDA 12.6.2 and cuDNN 9.5), as dpkg names it
# What ``tensorrt.__version__`` reports for that release, and so what plan manifests record:
# TensorRT's build.sh fills the Python bindings' version with major.minor.patch only, and the
# 10.5.0.18 release ships its wheel as tensorrt 10.5.0. Compare manifests with this one.
TENSORRT_PYTHON_VERSION = ".".join(TENSORRT_VERSION.split(".")[:3])
PYTRITON_VERSION = "0.7.0"  # its wheel carries tritonserver TRITON_VERSION, for the cpu target

TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
TENSORRT_IMAGE = f"nvcr.io/nvidia/tensorrt:{NGC_RELEASE}-py3"

_FOR_SCRIPTS = {
    "ngc": NGC_RELEASE,
    "pytriton": PYTRITON_VERSION,
    "triton": TRITON_VERSION,
    "tensorrt-image": TENSORRT_IMAGE,
    "triton-image": TRITON_IMAGE,
}

if __name__ == "__main__":  # for the Makefile and shell scripts, which cannot import the package
    if len(sys.argv) != 2 or sys.argv[1] not in _FOR_SCRIPTS:
        sys.exit(f"usage: python3 {sys.argv[0]} {'|'.join(_FOR_SCRIPTS)}")
    print(_FOR_SCRIPTS[sys.argv[1]])
