#!/usr/bin/env bash
# The GPU path's first real run, in one command, on a machine with an NVIDIA GPU, Docker with the
# NVIDIA Container Toolkit, Python 3.10+ and make:
#
#   bash build/gpu_first_run.sh [WORKDIR]          # default WORKDIR: gpu-first-run
#
# 1. exports HRNet_W18_C to ONNX here (offline weights; `make setup` makes ./.venv first);
# 2. in the pinned TensorRT container: records `dpkg -l | grep nvinfer` and tensorrt.__version__,
#    builds W18's FP16 plan (build/plans_in_container.sh) and writes the gpu repository;
# 3. serves that repository in the pinned Triton container (admin APIs locked with a fresh key);
# 4. classifies the sample photographs over HTTP and gRPC, runs a short `hrnet-triton bench`;
# 5. prints one report (python -m hrnet_triton.gpu_check): the container's TensorRT against the
#    pin, the plan's parity, the served answers against ONNX Runtime, throughput and p99.
# Everything it writes stays in WORKDIR; the Triton container is removed on exit.
set -euo pipefail
repo=$(realpath "$(dirname "$0")/..")
work=$(realpath -m "${1:-gpu-first-run}")
model=HRNet_W18_C
http_port=${HTTP_PORT:-8000}
grpc_port=${GRPC_PORT:-8001}
metrics_port=${METRICS_PORT:-8002}
release="$repo/core/hrnet_core/release.py"
tensorrt_image=$(python3 "$release" tensorrt-image)
triton_image=$(python3 "$release" triton-image)
venv="$repo/.venv/bin"
container="hrnet-gpu-first-run-$$"

for tool in docker nvidia-smi make curl; do
  command -v "$tool" >/dev/null || { echo "gpu_first_run.sh: $tool is needed and not on PATH" >&2; exit 2; }
done
mkdir -p "$work/onnx" "$work/plans"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$work/gpu.txt"

echo "== 1. export $model (offline weights)"
make -C "$repo" setup >/dev/null
if [ ! -f "$work/onnx/$model.onnx" ]; then
  "$venv/hrnet-triton" export "$model" --weights offline --out "$work/onnx/$model.onnx" --no-progress
fi

echo "== 2. plan and repository in $tensorrt_image"
docker run --rm --gpus all -e MODELS="$model" -e PRECISION=fp16 -e MAX_BATCH=32 \
  -v "$repo":/src:ro -v "$work":/work "$tensorrt_image" bash -euo pipefail -c '
    { dpkg -l | grep nvinfer || true; } > /work/tensorrt.txt
    python3 -c "import tensorrt; print(\"tensorrt.__version__=\" + tensorrt.__version__)" >> /work/tensorrt.txt
    mkdir /tmp/hrnet-triton
    cp -r /src/pyproject.toml /src/README.md /src/core /src/build /src/client /src/hrnet_triton /src/loadtest \
      /tmp/hrnet-triton/
    python3 -m pip install --quiet -c /src/build/engine-constraints.txt "/tmp/hrnet-triton[engine]"
    bash /src/build/plans_in_container.sh /work/onnx /work/plans /work/repository
  '
cat "$work/tensorrt.txt"

echo "== 3. serve it in $triton_image"
HRNET_TRITON_ADMIN_KEY=$(python3 -c "import secrets; print(secrets.token_urlsafe(24))")
export HRNET_TRITON_ADMIN_KEY
restricted="shared-memory,model-repository,statistics,trace,logging:admin-key=$HRNET_TRITON_ADMIN_KEY"
trap 'docker logs "$container" > "$work/triton.log" 2>&1 || true; docker rm -f "$container" >/dev/null 2>&1 || true' EXIT
docker run -d --name "$container" --gpus all --shm-size 1g \
  -p "$http_port:8000" -p "$grpc_port:8001" -p "$metrics_port:8002" -v "$work/repository":/models:ro \
  "$triton_image" tritonserver --model-repository=/models --disable-auto-complete-config \
  --http-restricted-api="$restricted" --grpc-restricted-protocol="$restricted" >/dev/null
for _ in $(seq 1 120); do
  if curl -fs "http://127.0.0.1:$http_port/v2/health/ready" >/dev/null; then break; fi
  sleep 2
done
curl -fs "http://127.0.0.1:$http_port/v2/models/$model/ready" >/dev/null \
  || { docker logs "$container" | tail -40 >&2; echo "gpu_first_run.sh: $model did not load" >&2; exit 1; }

echo "== 4. classify and bench"
"$venv/hrnet-triton" classify --samples --url "127.0.0.1:$http_port" --model "$model" --top-k 3
"$venv/hrnet-triton" classify --samples --url "127.0.0.1:$grpc_port" --protocol grpc --model "$model" --top-k 3 \
  >/dev/null
# perf_analyzer beside Locust when the tools environment starts here (docs/bench.md), else Locust alone
make -C "$repo" tools-env >/dev/null || echo "gpu_first_run.sh: no tools environment; bench runs Locust alone" >&2
tools=$("$venv/python" -c 'from hrnet_triton.tools import find_tools; find_tools()' 2>/dev/null \
  && echo perf_analyzer,locust || echo locust)
"$venv/hrnet-triton" bench --url "http://127.0.0.1:$http_port" --model "$model" --batch-sizes 1,8,32 \
  --concurrency 1,4,16 --seconds 10 --tools "$tools" --request-rates none --out "$work/bench"

echo "== 5. report"
"$venv/python" -m hrnet_triton.gpu_check --url "127.0.0.1:$http_port" --grpc-port "$grpc_port" --model "$model" \
  --onnx "$work/onnx/$model.onnx" --plans "$work/plans" --tensorrt-info "$work/tensorrt.txt" \
  --bench "$work/bench/bench.csv" | tee "$work/report.txt"
