#!/usr/bin/env bash
# One H100: the megatron conversion tests, the torch-vs-megatron agreement report (0.5B, bf16) and one full
# side-by-side comparison at seq 4096; every JSON / markdown / log lands in $OUT. Budget: < 9 minutes.
#
# Before (here, once): bash ../shared/tools/pack-gpu-wheels.sh pydantic==2.13.4 pydantic-core==2.46.4 \
#   annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 typer==0.29.2 click==8.5.1 \
#   rich==15.0.0 shellingham==1.5.4 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.20.0 safetensors==0.8.0 \
#   pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0
# Run (device tool, kind nvidia-h100-x1), carry [".whl"]:
#   FORGE_GIT_COMMIT=<sha of HEAD> bash benchmarks/gpu/compare_0.5b.sh
# Engines whose kernels need CuTeDSL's big part: unpack it into /tmp/cut first (two calls within ~30 s,
# the machine staying warm: benchmarks/gpu/split_big_carry.sh says how); this script adds /tmp/cut when it finds it.
# Results: $OUT/agreement/agreement.{json,md}, $OUT/compare/compare.{json,md} (+ raw/, logs/), and
# $OUT/results/<date>-h100-minicpm4-0.5b.{json,md}: copy those into benchmarks/results/ and commit.
# Knobs (environment): MBS (default 8), WARMUP (3), STEPS (8), BUDGET_S (510: the whole script), PART (all |
#   agreement | compare), STACK_TESTS (1; 0 skips tests/stacks when device time is short), STACKS (run order = table order), AGREEMENT_STACKS (megatron,megatron-sdpa),
#   AGREEMENT_PROBES (forward,backward,steps: bf16), AGREEMENT_FP32_PROBES (steps; each megatron probe ~40 s on an H100),
#   MODEL / SEQ / AGREEMENT_SEQ (minicpm4-0.5b / 4096 / 1024; `MODEL=tiny SEQ=64 AGREEMENT_SEQ=32` rehearses it on a CPU).
# Each part has a time budget and writes its report with whatever finished in it (the rest is marked skipped).
set -uo pipefail
: "${OUT:?set OUT to the output folder (the device machine sets it)}"
t0=$(date +%s)
BUDGET_S=${BUDGET_S:-510}
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
log() { echo "[compare_0.5b +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/script.log"; }
mkdir -p "$OUT"

log "installing carried wheels into /tmp/carried/site-packages"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/carried/site-packages .whl/*.whl \
  > "$OUT/install.log" 2>&1 || log "pip install reported errors (see install.log); going on with what installed"
export PYTHONPATH="/tmp/carried/site-packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d /tmp/cut/nvidia_cutlass_dsl ]; then  # CuTeDSL's big part, unpacked by an earlier call (engines may need it)
  cp -r /tmp/cut/nvidia_cutlass_dsl /tmp/carried/site-packages/ && export PYTHONPATH="$PYTHONPATH:/tmp/carried/site-packages/nvidia_cutlass_dsl/dsl_packages"
  log "CuTeDSL big part found in /tmp/cut: added"
fi
export FORGE_GIT_COMMIT="${FORGE_GIT_COMMIT:-unknown}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - > "$OUT/versions.json" 2>&1 <<'PY'
import importlib.metadata as m, json, torch
names = ["torch", "triton", "megatron-core", "pydantic", "typer", "safetensors", "numpy", "pytest"]
def v(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return None
print(json.dumps({n: v(n) for n in names} | {"cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}, indent=2))
PY
cat "$OUT/versions.json"

if [ "${STACK_TESTS:-1}" = 1 ]; then
  log "conversion + megatron CPU-model tests"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/stacks > "$OUT/tests_stacks.log" 2>&1
  log "tests/stacks exit $? ($(tail -n 1 "$OUT/tests_stacks.log"))"
fi

PART=${PART:-all}  # all | agreement | compare: rerun one part alone if the other already came back
if [ "$PART" != compare ]; then
  ab=$(( $(left) < 460 ? $(left) / 2 : 230 ))
  log "agreement report, torch vs megatron, 0.5B bf16 (budget ${ab}s)"
  timeout $(( ab + 20 )) python3 -m benchmarks.agreement --model "${MODEL:-minicpm4-0.5b}" --seq-length "${AGREEMENT_SEQ:-1024}" \
    --micro-batch-size 1 --grad-accum 2 --steps 3 --stacks "${AGREEMENT_STACKS:-megatron,megatron-sdpa}" \
    --probes "${AGREEMENT_PROBES:-forward,backward,steps}" --fp32-probes "${AGREEMENT_FP32_PROBES:-steps}" \
    --budget "$ab" --timeout 120 --out "$OUT/agreement" > "$OUT/agreement.log" 2>&1
  log "agreement exit $? (0: agree, 1: disagree or incomplete)"
  rm -rf "$OUT/agreement/cases" "$OUT/agreement/probes"  # GiBs of tensors: the report keeps the numbers
fi
if [ "$PART" != agreement ]; then
  cb=$(( $(left) - 10 ))
  log "side-by-side comparison, seq 4096 (budget ${cb}s)"
  timeout $(( cb + 5 )) python3 -m benchmarks.compare --model "${MODEL:-minicpm4-0.5b}" --seq-length "${SEQ:-4096}" \
    --micro-batch-size "${MBS:-8}" --warmup "${WARMUP:-3}" --steps "${STEPS:-8}" \
    --stacks "${STACKS:-megatron-sdpa,torch-compile,engines,torch-eager,megatron,torchtitan}" \
    --budget "$cb" --timeout 200 --out "$OUT/compare" --results-dir "$OUT/results" > "$OUT/compare.log" 2>&1
  log "compare exit $?"
fi
log "done in $(( $(date +%s) - t0 ))s"
