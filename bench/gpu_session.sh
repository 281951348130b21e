#!/usr/bin/env bash
# Everything a GPU session checks and measures, in one bounded command (about 10 minutes on an H200):
#   bash bench/gpu_session.sh [OUT_DIR]        (default: bench/results/session-<card>)
# 1. the GPU paths added since the last measured run, as tests (one config per kernel variant): a crash
#    here would poison the CUDA context for the bench, so they go first;
# 2. bit-exactness of the kernels against the numpy spec (bench/gpu_checks.py);
# 3. the kernel bench, quick subset, CUDA-graph timing, with each kernel's impl variants;
# 4. the rest of the kernel and triton-backend tests, in what time is left.
# Each step has its own time limit and a failing step does not stop the next; logs go to OUT_DIR
# (8 files: what the device tool brings back from $OUT).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))") || exit 2
out=${1:-bench/results/session-$card}
mkdir -p "$out"
step() {   # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}
step new-paths-tests 150 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider \
  tests/kernels tests/backends/test_triton_backend.py -k "tma or decode or fastest or cuda_graphs"
step gpu-checks 60 python3 bench/gpu_checks.py --out "$out/gpu_checks.json"
step kernels 330 python3 bench/kernels.py --quick --cudagraph --budget-s 250 --out-dir "$out"
step all-tests 150 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/backends/test_triton_backend.py
ls -la "$out"
