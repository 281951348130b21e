#!/usr/bin/env bash
# A GPU session's checks and measurements, in parts that each fit one device command (10 minutes at most;
# a session has 15 minutes of device time, start-up included):
#   bash bench/gpu_session.sh OUT_DIR decode     new-path tests, gpu checks, bench at M = 1, 16   (~6 min)
#   bash bench/gpu_session.sh OUT_DIR prefill    Gluon tests, bench at M = 2048 and 8192^3, merged into
#                                                decode's report (~6 min)
#   bash bench/gpu_session.sh OUT_DIR all-tests  the kernel and triton-backend tests on the GPU    (~2 min)
#   bash bench/gpu_session.sh OUT_DIR e2e        a Llama-shaped bf16 model end to end, torch vs slimfx
#                                                (bench/llama_gpu.py; not yet run: budget up to 9 min)
#   bash bench/gpu_session.sh OUT_DIR e2e-sparse the same model pruned 2:4 / 50% blocks, on the sparse
#                                                kernels (float and W8A8; not yet run: up to 9 min)
#   bash bench/gpu_session.sh OUT_DIR generate   tokens/s with a KV cache, transformers generate vs
#                                                compile_causal_lm on triton (bench/llama_generate.py;
#                                                not yet run: up to 9 min)
#   bash bench/gpu_session.sh OUT_DIR moe        int8 and int4 experts: the grouped weight-only kernels vs bf16 grouped
#                                                GEMM and dequantize + grouped GEMM (bench/moe_gpu.py, ~2 min)
# decode runs, in order:
# 1. the GPU paths added since the last measured run, as tests (one config per kernel variant): a crash
#    there would poison the CUDA context for the bench, so they go first;
# 2. bit-exactness of the kernels against the numpy spec (bench/gpu_checks.py);
# 3. the kernel bench (quick subset, CUDA-graph timing, each kernel's impl variants beside auto).
# Each step has its own time limit and a failing step does not stop the next; logs and results go to
# OUT_DIR. The script exits 2 before doing anything on a part name it does not know or on a machine without a
# CUDA device, and 1 when any step failed (after running the rest and listing OUT_DIR). prefill merges into
# decode's report, so OUT_DIR must survive between the two commands: with the device tool, an ignored folder
# of the working tree (it stays on the warm machine; $OUT is emptied before each command), copied to $OUT at
# the end of each command, e.g.
#   bash bench/gpu_session.sh .session decode; cp .session/* "$OUT"/     (8 files at most come back)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
usage="usage: bash bench/gpu_session.sh OUT_DIR decode|prefill|all-tests|e2e|e2e-sparse|generate|moe"
out=${1:?$usage}
what=${2:?$usage}
case $what in
  decode|prefill|all-tests|e2e|e2e-sparse|generate|moe) ;;
  *) echo "unknown part '$what': decode, prefill, all-tests, e2e, e2e-sparse, generate or moe" >&2; exit 2 ;;
esac
# every part measures or tests on the GPU: without one, its steps would only run into their time limits
if ! timeout 120 python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu_session.sh: no CUDA device visible to python3's torch here; the session's parts need one" >&2
  exit 2
fi
mkdir -p "$out"
failed=""
step() {   # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed="$failed $name"
}
tests="tests/test_kernels tests/backends/test_triton_backend.py"
bench="python3 bench/kernel_bench.py --quick --cudagraph --out-dir $out"
new_paths="(tma or decode or fastest or cuda_graphs or split_k or int8_to_f32 or halves or pinned or word_aligned"
new_paths="$new_paths or lowered or bsr_int8_bit)"
case $what in
  decode)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    step new-paths-tests 100 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider $tests \
      -k "$new_paths and not gluon"
    step gpu-checks 60 python3 bench/gpu_checks.py --out "$out/gpu_checks.json"
    step kernels-decode 205 $bench --m 1,16 --budget-s 175 ;;
  prefill)
    # the Gluon kernels (every config pinned, bit-exact vs tiled) before the bench that times them
    step gluon-tests 75 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider $tests -k gluon
    step kernels-prefill 300 $bench --m 2048,8192 --budget-s 270 --merge ;;
  all-tests)
    step all-tests 400 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider $tests ;;
  e2e)
    step llama-e2e 540 python3 bench/llama_gpu.py --out-dir "$out" ;;
  e2e-sparse)
    step llama-e2e-sparse 540 python3 bench/llama_gpu.py --out-dir "$out" --stem llama_gpu_sparse \
      --schemes 2:4,bsr50,w8a8-bsr50 ;;
  generate)
    step llama-generate 540 python3 bench/llama_generate.py --out-dir "$out" --schemes none,w8a8,w8a16 ;;
  moe)
    step moe-tests 100 env SLIMFX_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider $tests -k "grouped or experts"
    step moe-bench 200 python3 bench/moe_gpu.py --cudagraph --out-dir "$out" ;;
esac
ls -la "$out"
if [ -n "$failed" ]; then
  echo "== failed steps:$failed" >&2
  exit 1
fi
