#!/usr/bin/env bash
# `pretrain --cuda-graph` end to end on one GPU (0.5B, compiled, CUDA default ops, pretrain's default
# deterministic mode): a run stopped after step 3 with a checkpoint, then resumed to step 6, against the
# same 6 steps run straight through with the graph (expected: the same losses bit for bit) and without it
# (expected: close, same math). Writes $OUT/graph_pretrain/summary.json and the logs.
# Run after `bash benchmarks/gpu/session.sh` (no part: installs the carried wheels).
#   OUT=... bash benchmarks/gpu/graph_pretrain.sh
set -uo pipefail
: "${OUT:?}"
cd "$(dirname "$0")/../.."
d="$OUT/graph_pretrain"; mkdir -p "$d"
ck="/tmp/graph_pretrain_ck"; rm -rf "$ck"
export PYTHONPATH="/opt/carried/site-packages:$PWD/exports/train_engine_0.5B/src:$PWD:/opt/carried/site-packages/nvidia_cutlass_dsl/dsl_packages" PYTHONUNBUFFERED=1
p="timeout 150 python3 -m train_engine_0_5b pretrain --seq-length ${SEQ:-1024} --global-batch-size 4 --micro-batch-size 4 \
  --num-steps 6 --warmup-steps 2 --compile"
$p --cuda-graph --save-dir "$ck" --save-interval 3 --exit-after-steps 3 --log-file "$d/resumed.jsonl" > "$d/part1.txt" 2>&1
echo "[graph_pretrain] part 1 (steps 1-3, checkpoint): exit $?"
$p --cuda-graph --save-dir "$ck" --resume --log-file "$d/resumed.jsonl" > "$d/part2.txt" 2>&1
echo "[graph_pretrain] part 2 (resume, steps 4-6): exit $?"
$p --cuda-graph --log-file "$d/straight.jsonl" > "$d/straight.txt" 2>&1
echo "[graph_pretrain] straight, graph: exit $?"
$p --no-cuda-graph --log-file "$d/eager.jsonl" > "$d/eager.txt" 2>&1
echo "[graph_pretrain] straight, no graph: exit $?"
rm -rf "$ck"
python3 - "$d" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
def losses(name):
    f = d / f"{name}.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, f.read_text().splitlines())} if f.exists() else {}
runs = {n: losses(n) for n in ("resumed", "straight", "eager")}
r, s, e = runs["resumed"], runs["straight"], runs["eager"]
common = sorted(set(s) & set(e))
summary = {
    "losses": runs,
    "resumed_equals_straight_bitwise": bool(r) and len(r) == 6 and r == s,
    "graph_vs_no_graph_max_rel": max((abs(s[k] - e[k]) / abs(e[k]) for k in common), default=None),
}
(d / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
