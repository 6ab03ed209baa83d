#!/usr/bin/env bash
# Stage-1 gates M1-M3 for the full MiniCPM4-0.5B config in bf16 on one GPU (H100) against the torch
# reference on the same GPU. Reports (JSON) go to $OUT/<engine>/<gate>.json, plus $OUT/summary.txt with
# the measured errors and the tolerance used; commit them under benchmarks/results/gates/.
#
#   OUT=/path/to/out bash benchmarks/gpu/gates_0.5b.sh
#
# Cases: fresh random weights (seed $SEED, recorded), seq $SEQ, $ROWS row(s) per micro batch (M1: 1
# global batch of ROWS rows; M2: 2 micro batches; M3: 4 steps x 1 micro batch). Logits of one
# 2048-token row are 2048 x 73448 bf16 (~300 MB) per stack. Engines: exports/train_engine_0.5B when
# present, and the red-team base engine (a second, eager implementation: SDPA + fused QKV) as a
# calibration point for the bf16 bound. A few minutes in all.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT to the output directory}"
SEED="${SEED:-1234}"
SEQ="${SEQ:-2048}"
ROWS="${ROWS:-1}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } > "$OUT/gpu.txt"

engines=()
[ -f exports/train_engine_0.5B/src/train_engine_0_5b/__main__.py ] && engines+=(exports/train_engine_0.5B)
[ "${SKIP_BASE:-0}" = 1 ] || engines+=(tests/redteam/engines/base)  # SKIP_BASE=1: the export alone

status=0
for engine in "${engines[@]}"; do
  name="$(basename "$engine")"
  for gate in m1_forward m2_backward m3_optimizer; do
    echo "=== $name $gate"
    bash agent-loop.sh gate "$gate" --engine "$engine" --reference torch --case minicpm4-0.5b \
      --device cuda --dtype bfloat16 --seq-length "$SEQ" --rows "$ROWS" --steps 4 --seed "$SEED" \
      --timeout 900 --out "$OUT/$name"
    rc=$?
    echo "=== $name $gate exit $rc"
    [ "$rc" -ne 0 ] && status=1
  done
done

python3 - "$OUT" > "$OUT/summary.txt" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*/*.json")):
    r = json.loads(f.read_text())
    t = r.get("tensors") or []
    worst = max(t, key=lambda d: d["rel"], default=None)
    worst_max = max(t, key=lambda d: d["max_rel"], default=None)
    print(f"{f.parent.name} {r['gate']}: {r['verdict']} ({r['time_s']:.0f}s) policy: {r['policy'].get('describe')}")
    if worst:
        print(f"  worst rel {worst['rel']:.3e} ({worst['name']}); worst max_rel {worst_max['max_rel']:.3e} ({worst_max['name']})")
        for name in ("logits", "loss", "losses[3]"):
            d = next((d for d in t if d["name"] == name), None)
            if d:
                print(f"  {name}: rel {d['rel']:.3e} max_rel {d['max_rel']:.3e}")
    if r.get("localization"):
        print(f"  where: {r['localization']['what']}")
    print(f"  case {r['case'].get('model')} seq {r['case'].get('seq_length')} rows {r['case'].get('global_rows')} "
          f"seed {r['case'].get('seed')} on {r['hardware'].get('gpu')}")
PY
cat "$OUT/summary.txt"
exit $status
