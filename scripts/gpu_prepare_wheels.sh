#!/usr/bin/env bash
# Fills wheels/ (git-ignored) with the pure-Python or manylinux x86-64 wheels, for the GPU image's
# Python 3.12, of every package scripts/gpu_check.sh may have to install there without network.
# The image is known to hold all of them (KINDS.md's package list), so this is the fallback for an
# image that lacks one: run it here (it needs pip's registry), then carry the folder with the call:
#     scripts/gpu_prepare_wheels.sh
#     run(command="bash scripts/gpu_check.sh", carry=["wheels"], timeout_s=600)
# gpu_check.sh installs only the wheels of modules the machine lacks, with --no-deps, so every
# dependency is listed here by name and version (one version of each).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
pyver="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p wheels
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest wheels \
  --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any \
  "pytest==9.2.0" "iniconfig==2.3.1" "pluggy==1.7.0" "packaging==26.4" "pygments==2.21.0" \
  "hypothesis==6.170.17" "sortedcontainers==2.4.0" \
  "ml-dtypes==0.6.0" "safetensors==0.8.0" "tqdm==4.70.1"
ls -l wheels
du -sh wheels
