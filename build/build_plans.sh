#!/usr/bin/env bash
# Build TensorRT plans for every exported model in ARTIFACTS, on this GPU host, inside the
# pinned TensorRT container (the same NGC release as the Triton server that will load them).
#
#   bash build/build_plans.sh ARTIFACTS [PRECISION] [MAX_BATCH]
#
# ARTIFACTS holds <VARIANT>.onnx files from `hrnet-triton export`; the plans are written to
# ARTIFACTS/plans/<VARIANT>.sm<CC>.<PRECISION>.plan with a .plan.json manifest beside each
# (build/plans_in_container.sh does the work; plans already current are kept). Then:
#   hrnet-triton repo --target gpu --plans-dir ARTIFACTS/plans --out model_repository
set -euo pipefail
artifacts=$(realpath "${1:?usage: build_plans.sh ARTIFACTS [fp16|fp32] [MAX_BATCH]}")
precision=${2:-fp16}
max_batch=${3:-32}
repo=$(realpath "$(dirname "$0")/..")
image=$(python3 "$repo/core/hrnet_core/release.py" tensorrt-image)
command -v docker >/dev/null || { echo "build_plans.sh: docker is needed to run $image" >&2; exit 2; }
docker run --rm --gpus all -e PRECISION="$precision" -e MAX_BATCH="$max_batch" -e MODELS="${MODELS:-}" \
  -v "$repo":/src:ro -v "$artifacts":/artifacts "$image" bash -euo pipefail -c '
    mkdir /tmp/hrnet-triton
    cp -r /src/pyproject.toml /src/README.md /src/core /src/build /src/client /src/hrnet_triton /src/loadtest \
      /tmp/hrnet-triton/
    python3 -m pip install --quiet -c /src/build/engine-constraints.txt "/tmp/hrnet-triton[engine]"
    bash /src/build/plans_in_container.sh /artifacts /artifacts/plans
  '
