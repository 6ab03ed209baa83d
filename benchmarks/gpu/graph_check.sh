#!/usr/bin/env bash
# --cuda-graph on the GPU: its test once per op variant (each in its own process: a fault poisons the
# CUDA context), compute-sanitizer's memcheck on the first variant that fails, then the compiled 0.5B step
# replayed as one graph. Run after `bash benchmarks/gpu/session.sh` (no part: installs the carried wheels).
#   OUT=... bash benchmarks/gpu/graph_check.sh       -> $OUT/graph_check.tgz
set -uo pipefail
: "${OUT:?}"
cd "$(dirname "$0")/../.."
d="$OUT/graph_check"; mkdir -p "$d"
export PYTHONPATH="/opt/carried/site-packages:$PWD/exports/train_engine_0.5B/src:$PWD:/opt/carried/site-packages/nvidia_cutlass_dsl/dsl_packages" PYTHONUNBUFFERED=1
t=exports/train_engine_0.5B/tests/test_engine_cuda_graph.py::test_graphed_run_matches_the_eager_run
failed=""
for v in ${VARIANTS:-plain-eager plain-compiled flash4 quack default}; do
  timeout 150 python3 -m pytest -p no:cacheprovider -rfEs -W ignore::DeprecationWarning "$t[$v]" > "$d/test_$v.txt" 2>&1
  rc=$?; echo "[graph_check] $v: exit $rc: $(tail -n 1 "$d/test_$v.txt")"
  [ $rc -ne 0 ] && [ -z "$failed" ] && failed=$v
done
if [ -n "$failed" ] && [ "${SANITIZE:-1}" = 1 ]; then
  timeout ${SANITIZE_S:-180} compute-sanitizer --tool memcheck --print-limit 4 python3 -m pytest -p no:cacheprovider -x \
    -W ignore::DeprecationWarning "$t[$failed]" > "$d/memcheck_$failed.txt" 2>&1
  echo "[graph_check] memcheck on $failed: exit $?"; grep -m 8 -A 6 "Invalid\|ERROR SUMMARY" "$d/memcheck_$failed.txt"
fi
if [ "${BENCH:-1}" = 1 ]; then
  timeout 200 python3 -m train_engine_0_5b bench --seq-length 4096 --steps 8 --warmup 3 --micro-batch-size ${MBS:-8} \
    --compile --cuda-graph --json "$d/compile_cuda_graph_mb${MBS:-8}.json" > "$d/bench_log.txt" 2>&1
  echo "[graph_check] bench --cuda-graph: exit $?"; grep -m 5 '"tokens_per_s"\|"mfu"\|"peak_mem_gib"\|Error' "$d/bench_log.txt"
fi
tar czf "$OUT/graph_check.tgz" -C "$OUT" graph_check && rm -rf "$d"
