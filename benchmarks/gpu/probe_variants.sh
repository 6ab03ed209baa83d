#!/usr/bin/env bash
# One steps case, the torch reference (twice: its own run-to-run spread) and the 0.5B engine under several
# op selections; prints and writes ($OUT/probe_variants.json) each run's per-step losses and grad norms and
# their relative difference from the first reference run. For locating which op or path moves a gate metric.
#   OUT=dir [SEQ=2048 ROWS=1 STEPS=4 SEED=1234 LR=peak] bash benchmarks/gpu/probe_variants.sh "" "adamw=foreach" ...
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?}"
SEQ="${SEQ:-2048}"; ROWS="${ROWS:-1}"; STEPS="${STEPS:-4}"; SEED="${SEED:-1234}"
work=$(mktemp -d)
bash agent-loop.sh case new --out "$work/case" --model minicpm4-0.5b --steps "$STEPS" --micro-batch-size "$ROWS" \
  --seq-length "$SEQ" --dtype bfloat16 --device cuda --seed "$SEED" ${LR:+--lr "$LR"} || exit 1
runs=()
for i in 1 2; do
  bash agent-loop.sh case probe steps --case "$work/case" --out "$work/ref$i" --stack torch && runs+=("ref$i=$work/ref$i")
done
export PYTHONPATH="$PWD/exports/train_engine_0.5B/src${PYTHONPATH:+:$PYTHONPATH}"
for ops in "$@"; do
  name="engine[${ops:-default}]"
  python3 -m train_engine_0_5b probe steps --case "$work/case" --out "$work/e$(( ${#runs[@]} ))" --ops "$ops" \
    && runs+=("$name=$work/e$(( ${#runs[@]} ))")
done
python3 - "$OUT/probe_variants.json" "${runs[@]}" <<'PY'
import json, sys
from safetensors.torch import load_file
runs = {a.rsplit("=", 1)[0]: load_file(a.rsplit("=", 1)[1] + "/tensors.safetensors") for a in sys.argv[2:]}
base = next(iter(runs.values()))
rel = lambda a, b: (a.double() - b.double()).abs().div(b.double().abs()).tolist()
out = {}
for name, t in runs.items():
    out[name] = {k: t[k].double().tolist() for k in ("losses", "grad_norms")}
    out[name]["rel_grad_norms"] = rel(t["grad_norms"], base["grad_norms"])
    w = [k for k in t if k.startswith("weight.")]
    out[name]["worst_weight_rel"] = max(((t[k].double() - base[k].double()).norm() / base[k].double().norm()).item() for k in w)
    print(f"{name:40s} norms {['%.5f' % x for x in out[name]['grad_norms']]} rel {['%.1e' % x for x in out[name]['rel_grad_norms']]} "
          f"worst weight rel {out[name]['worst_weight_rel']:.2e}")
json.dump(out, open(sys.argv[1], "w"), indent=1)
PY
