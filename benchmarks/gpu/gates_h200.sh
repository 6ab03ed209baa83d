#!/usr/bin/env bash
# The gates on one H200 for exports/train_engine_0.5B, as the forge loop runs them, plus the engine's own
# `bench` beside M5's gate-timed figure. Run from a clean snapshot of a commit (the device tool copies the
# working tree), with the packed wheels (../shared/tools/pack-gpu-wheels.sh) and CuTeDSL's big part in /tmp/cut:
#
#   [BENCH=0] bash benchmarks/gpu/gates_h200.sh WHEEL_DIR PART   # PART: speed (M5) | correctness (M7, M1-M3);
#   both run the engine's bench first unless BENCH=0
#
# Writes $OUT/<part>/... (gate reports, summary.jsonl) and $OUT/<part>.log; FORGE_GIT_COMMIT names the commit.
set -uo pipefail
WHL="${1:?wheel dir}"
PART="${2:?speed | correctness}"
OUT="${OUT:?set OUT}"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHL"/*.whl || exit 1
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# CuTeDSL's big part merges into the package its small wheel installed; its dsl_packages go on sys.path
cp -r /tmp/cut/nvidia_cutlass_dsl "$site/" && echo "$site/nvidia_cutlass_dsl/dsl_packages" > "$site/cutlass_dsl_packages.pth" || exit 1
PYTHONPATH="exports/train_engine_0.5B/src" python3 -m train_engine_0_5b info > "$OUT/engine_info.txt" 2>&1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; echo "commit ${FORGE_GIT_COMMIT:-?}";
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
ENGINE=exports/train_engine_0.5B
mkdir -p "$OUT/$PART"
if [ "${BENCH:-1}" = 1 ]; then  # the engine's own figure, beside the gate's
  PYTHONPATH="$ENGINE/src" timeout 300 python3 -m train_engine_0_5b bench --seq-length 4096 --micro-batch-size 8 \
    --steps 10 --json "$OUT/$PART/bench_mb8.json" > "$OUT/$PART/bench_mb8.out" 2>&1
  echo "bench exit $?"
fi
if [ "$PART" = speed ]; then
  python3 -m benchmarks.gpu.gate_stage --engine "$ENGINE" --gates m5 --out "$OUT/$PART" --speed-steps "${SPEED_STEPS:-10}" \
    --speed-global-batch-size "${SPEED_GB:-64}" --speed-micro-batch-size 8 --long-train-steps "${LT:-20}" --timeout "${SPEED_TIMEOUT:-500}"
else
  python3 -m benchmarks.gpu.gate_stage --engine "$ENGINE" --gates "${GATES:-m7,m1,m2,m3}" --out "$OUT/$PART" \
    --seq-length "${SEQ:-2048}" --timeout "${TIMEOUT:-300}"
fi
