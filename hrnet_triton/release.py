"""The one Triton release this project targets, and everything derived from it.

TensorRT plans only load in the TensorRT version they were built with, so the serving
container (``tritonserver``) and the container that builds plans (``tensorrt``) must be the
same NGC release. Change ``NGC_RELEASE`` (and the facts beside it, from NVIDIA's Frameworks
Support Matrix) to move the whole project to another release.

24.10 is chosen because it is Triton 2.51.0, the same server as the ``tritonserver`` binary in
the ``nvidia-pytriton`` 0.7.0 wheel that serves the CPU target, and because 24.x releases still
support compute capability 6.0+, which covers both GPUs in PaddleClas's benchmark table (V100
is 7.0, T4 is 7.5); releases from 25.01 on require 7.5.
"""

from __future__ import annotations

NGC_RELEASE = "24.10"
TRITON_VERSION = "2.51.0"
TENSORRT_VERSION = "10.5.0.18"  # 24.10 containers: CUDA 12.6.2, cuDNN 9.5, TensorRT 10.5.0.18
CUDA_VERSION = "12.6.2"
MIN_COMPUTE_CAPABILITY = (6, 0)

TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
TENSORRT_IMAGE = f"nvcr.io/nvidia/tensorrt:{NGC_RELEASE}-py3"
PYTRITON_VERSION = "0.7.0"  # its wheel carries tritonserver TRITON_VERSION for the CPU target
