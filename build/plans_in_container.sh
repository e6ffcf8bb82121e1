#!/usr/bin/env bash
# Build the TensorRT plans for staged ONNX models on this GPU, and optionally write the gpu-target
# Triton repository from them. Runs inside the pinned TensorRT container with this project
# installed: build/build_plans.sh runs it under Docker, the k8s engine-builder Job runs it in
# the engine-builder image (Dockerfile). REPOSITORY, if given, is replaced whole at the end.
#
#   plans_in_container.sh ONNX_DIR PLANS_DIR [REPOSITORY]
#
# ONNX_DIR holds <MODEL>.onnx from `hrnet-triton export`, and the <MODEL>_uint8.onnx it writes beside
# it (the uint8 entry point, normalised in the model), which gets its own plan when present. Plans go to
# PLANS_DIR/<MODEL>[_uint8].sm<CC>.<PRECISION>.plan (+ .plan.json), one per GPU architecture (CC), which
# `hrnet-triton engine --plans-dir` reads from the CUDA driver (nvidia-smi's compute_cap field
# does not exist in the R470 drivers that Triton 24.10 still allows on data-center GPUs).
# A plan already built from the same ONNX file for this GPU, TensorRT version, precision and
# profile is kept (`hrnet-triton engine --skip-if-current`), so running again is cheap.
# Environment: MODELS (default: every ONNX_DIR/*.onnx), PRECISION (fp16), MAX_BATCH (32).
set -euo pipefail
onnx_dir=${1:?usage: plans_in_container.sh ONNX_DIR PLANS_DIR [REPOSITORY]}
plans=${2:?usage: plans_in_container.sh ONNX_DIR PLANS_DIR [REPOSITORY]}
repository=${3:-}
precision=${PRECISION:-fp16}
max_batch=${MAX_BATCH:-32}

read -r -a models <<<"${MODELS:-}"
if [ ${#models[@]} -eq 0 ]; then
  for onnx in "$onnx_dir"/*.onnx; do
    case $onnx in *_uint8.onnx) continue ;; esac # built with its model below
    [ -e "$onnx" ] && models+=("$(basename "$onnx" .onnx)")
  done
fi
if [ ${#models[@]} -eq 0 ]; then
  echo "plans_in_container.sh: no <MODEL>.onnx in $onnx_dir; stage the exported models there first" >&2
  exit 2
fi
for name in "${models[@]}"; do
  if [ ! -f "$onnx_dir/$name.onnx" ]; then
    echo "plans_in_container.sh: $onnx_dir/$name.onnx is missing; export it with \`hrnet-triton export $name\`" >&2
    exit 2
  fi
done

mkdir -p "$plans"
for name in "${models[@]}"; do
  for onnx in "$onnx_dir/$name.onnx" "$onnx_dir/${name}_uint8.onnx"; do
    [ -f "$onnx" ] || continue # an export from before the uint8 models has none
    hrnet-triton engine "$name" --onnx "$onnx" --precision "$precision" --max-batch "$max_batch" \
      --plans-dir "$plans" --skip-if-current
  done
done
if [ -n "$repository" ]; then
  # Written beside, then renamed into place: Triton (which loads the repository once, at start)
  # never finds half of it, and an interrupted run leaves the previous repository as it was.
  rm -rf "$repository.partial" "$repository.previous"
  hrnet-triton repo --target gpu --plans-dir "$plans" --precision "$precision" --out "$repository.partial" \
    --variants "${models[@]}"
  if [ -e "$repository" ]; then mv "$repository" "$repository.previous"; fi
  mv "$repository.partial" "$repository"
  rm -rf "$repository.previous"
fi
