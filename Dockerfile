# The two images the Kubernetes deployment builds from this project (k8s/README.md). The server
# itself is NVIDIA's tritonserver image as published; nothing of this project runs inside it.
#
#   docker build --target engine-builder -t REGISTRY/hrnet-triton-engine-builder:0.1.0 .
#   docker build --target loadtest       -t REGISTRY/hrnet-triton-loadtest:0.1.0 .
#
# TENSORRT_IMAGE must be the TensorRT container of the Triton release the server runs
# (hrnet_triton/release.py): plans load only in the TensorRT version that built them.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Builds the plans on a GPU node: build/plans_in_container.sh with `hrnet-triton engine`.
FROM ${TENSORRT_IMAGE} AS engine-builder
COPY . /opt/hrnet-triton
RUN python3 -m pip install --no-cache-dir "/opt/hrnet-triton[engine]" \
    && { id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home --shell /bin/bash hrnet; }
USER 1000
WORKDIR /tmp

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
