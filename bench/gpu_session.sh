#!/usr/bin/env bash
# A GPU session's checks and measurements, as bounded steps (one device command may run 10 minutes):
#   bash bench/gpu_session.sh OUT_DIR                 measure: new-path tests, gpu checks, kernel bench (~9 min)
#   bash bench/gpu_session.sh OUT_DIR all-tests       the kernel and triton-backend tests on the GPU (~2 min)
# measure runs, in order:
# 1. the GPU paths added since the last measured run, as tests (one config per kernel variant): a crash
#    there would poison the CUDA context for the bench, so they go first;
# 2. bit-exactness of the kernels against the numpy spec (bench/gpu_checks.py);
# 3. the kernel bench, quick subset, CUDA-graph timing, with each kernel's impl variants beside auto.
# Each step has its own time limit and a failing step does not stop the next; logs and results go to
# OUT_DIR (at most 8 files: what the device tool brings back from $OUT).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [measure|all-tests]}
what=${2:-measure}
mkdir -p "$out"
step() {   # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}
tests="tests/kernels tests/backends/test_triton_backend.py"
case $what in
  measure)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    step new-paths-tests 100 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider $tests \
      -k "tma or decode or fastest or cuda_graphs or split_k or int8_to_f32"
    step gpu-checks 45 python3 bench/gpu_checks.py --out "$out/gpu_checks.json"
    step kernels 390 python3 bench/kernels.py --quick --cudagraph --budget-s 320 --out-dir "$out" ;;
  all-tests)
    step all-tests 400 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider $tests ;;
  *) echo "unknown step group '$what': measure or all-tests" >&2; exit 2 ;;
esac
ls -la "$out"
