# The three images the Kubernetes deployment builds from this project (k8s/README.md).
#
#   docker build --build-arg NGC_RELEASE=$(python3 core/hrnet_core/release.py ngc) \
#                --target engine-builder -t REGISTRY/hrnet-triton-engine-builder:0.1.0 .
#   docker build --build-arg NGC_RELEASE=$(python3 core/hrnet_core/release.py ngc) \
#                --target server         -t REGISTRY/hrnet-triton-server:0.1.0 .
#   docker build --target loadtest       -t REGISTRY/hrnet-triton-loadtest:0.1.0 .
#
# NGC_RELEASE is the release the server runs (core/hrnet_core/release.py, the one place it is
# written; tests/test_release.py checks the default below against it). The server is that
# release's tritonserver image, and the plan builder its TensorRT container: TensorRT plans
# load only in the TensorRT version that built them.
ARG NGC_RELEASE=24.10
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Builds the plans on a GPU node: build/plans_in_container.sh with `hrnet-triton engine`.
FROM nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3 AS engine-builder
COPY . /opt/hrnet-triton
RUN python3 -m pip install --no-cache-dir -c /opt/hrnet-triton/build/engine-constraints.txt "/opt/hrnet-triton[engine]" \
    && { id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home --shell /bin/bash hrnet; }
USER 1000
WORKDIR /tmp

# The Triton server: NVIDIA's tritonserver image of the release, plus what hrnet_preprocess (the
# python-backend model of the <variant>_image ensembles, docs/inputs.md) imports: this project's
# base install (hrnet_core with numpy, OpenCV, imagesize), pinned to the numpy-1 releases of
# build/engine-constraints.txt for the image's Python 3.10 and its python backend stub.
# The onnx target (the cpu overlay) runs on the image's own openvino backend (docs/cpu-speed.md):
# the build stops here if the release does not ship it.
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3 AS server
COPY . /opt/hrnet-triton
RUN python3 -m pip install --no-cache-dir -c /opt/hrnet-triton/build/engine-constraints.txt /opt/hrnet-triton \
    && python3 -c "import numpy, hrnet_core.preprocess; assert numpy.__version__.startswith('1.'), numpy.__version__" \
    && test -f /opt/tritonserver/backends/openvino/libtriton_openvino.so
USER 1000

# Locust master and workers: loadtest/hrnet.py needs the project's client package; the
# deployment mounts the current hrnet.py over the copy in the image.
FROM ${PYTHON_IMAGE} AS loadtest
COPY . /opt/hrnet-triton
RUN python -m pip install --no-cache-dir "/opt/hrnet-triton[loadtest]" \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin locust
USER 1000
WORKDIR /tmp
EXPOSE 8089 5557
ENTRYPOINT ["locust"]
CMD ["-f", "/opt/hrnet-triton/loadtest/hrnet.py"]
