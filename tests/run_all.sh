#!/usr/bin/env bash
# The whole test suite: installs what it needs from the project's own files,
# builds aimass the way the README installs it (plus the C++ tests), then runs
# C++ (ctest), Python (pytest) and MPI tests (pytest under mpirun -np 2, 3, 4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PYTHONDONTWRITEBYTECODE=1

step() { printf '\n==== %s\n' "$*"; }

step "dependencies"
"$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
if [ ! -f /usr/include/gtest/gtest.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
  else
    echo "C++ tests need GoogleTest: sudo apt-get install libgtest-dev" >&2
    exit 1
  fi
fi

# the registry's PostgreSQL tests start a throwaway cluster with Debian's initdb/pg_ctl
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "registry tests need PostgreSQL (they skip without it): sudo apt-get install postgresql" >&2
  fi
fi

# optional Debian packages: install when missing (root + apt-get), else say what will skip
apt_optional() {  # apt_optional PACKAGE COMMAND WHAT-HAPPENS-WITHOUT-IT
  command -v "$2" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null; } ||
      echo "could not install $1: $3" >&2
  else
    echo "no $2 and no root apt-get: $3" >&2
  fi
}
# Debian's Chromium for the dashboard test (playwright's own browser download is not reachable)
apt_optional chromium chromium "the dashboard test will skip"
# Debian's wrk: the serve benchmark's load generator (tests/python/test_serve_bench.py checks it;
# the benchmark falls back to its asyncio client without it)
apt_optional wrk wrk "the serve benchmark will use its asyncio client"

# OpenSSL's libcrypto headers: `aimass serve --http native` (the C++ front end) hashes tokens with it;
# without them the build compiles the front end out and its tests skip
if [ ! -f /usr/include/openssl/sha.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev >/dev/null; } ||
      echo "could not install libssl-dev: aimass serve --http native will be compiled out" >&2
  else
    echo "no libssl-dev and no root apt-get: aimass serve --http native will be compiled out" >&2
  fi
fi

step "build and install aimass (with C++ tests)"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation \
  -Ccmake.define.AIMASS_BUILD_TESTS=ON -Cbuild-dir=build/test .

# pytest exits 5 when it collects nothing; a suite part that has no tests yet is
# reported, not treated as a pass of something that never ran.
run_pytest() {
  local rc=0
  "$@" || rc=$?
  if [ "$rc" = 5 ]; then echo "no tests collected by: $*" >&2; fi
  return "$rc"
}

step "C++ tests (ctest)"
ctest --test-dir build/test --output-on-failure -j2 --timeout 300

step "fuzz corpus + crash replay (gcc, ASan + UBSan)"
# every tests/fuzz/fuzz_<target>.cc, linked with replay_main.cc, over its kept corpus
# and crash repros (tests/fuzz/README.md; the full libFuzzer run is in docs/development.md)
cmake -S . -B build/fuzz-replay -G Ninja -DAIMASS_BUILD_FUZZ=ON -DAIMASS_BUILD_PYTHON=OFF \
  -DAIMASS_WITH_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" >/dev/null
# (quiet: gcc's -O1 AVX-512 warnings would fill the log; shown when the build fails)
cmake --build build/fuzz-replay -j2 --target fuzz_all >build/fuzz-replay.log 2>&1 \
  || { tail -n 60 build/fuzz-replay.log >&2; exit 1; }
for src in tests/fuzz/fuzz_*.cc; do
  t=$(basename "$src" .cc); t=${t#fuzz_}
  dirs=()
  for d in "tests/fuzz/corpus/$t" "tests/fuzz/crashes/$t"; do [ -d "$d" ] && dirs+=("$d"); done
  [ "${#dirs[@]}" -gt 0 ] || { echo "fuzz_$t: no corpus/$t or crashes/$t to replay" >&2; exit 1; }
  printf 'fuzz_%s: ' "$t"
  ASAN_OPTIONS=abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    timeout 300 "build/fuzz-replay/fuzz/fuzz_$t" "${dirs[@]}"
done

step "Python tests"
run_pytest "$PY" -m pytest tests/python -q -p no:cacheprovider

MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
for np in 2 3 4; do
  step "MPI tests, mpirun -np $np"
  logs="build/mpi-logs/np$np"
  rm -rf "$logs" && mkdir -p "$logs"
  rc=0
  # every rank runs the same tests into its own log; rank 0's is shown, all on failure. A test
  # still running after 45 s dumps every thread's stack into its rank's log (a peer's engine
  # times out at 60 s and aborts the job), so a hang says where each rank was.
  timeout 1200 "${MPIRUN[@]}" -np "$np" bash -c \
    'exec "$0" -m pytest tests/mpi -q -p no:cacheprovider -x -o faulthandler_timeout=45 > "$1/rank.${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}.log" 2>&1' \
    "$PY" "$logs" || rc=$?
  cat "$logs/rank.0.log" 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    echo "mpirun -np $np failed (exit $rc); logs of every rank:" >&2
    for f in "$logs"/rank.*.log; do echo "--- $f"; cat "$f"; done >&2
    exit "$rc"
  fi
done
step "all tests passed"
