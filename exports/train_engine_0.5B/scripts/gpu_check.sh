#!/usr/bin/env bash
# GPU check of train_engine_0.5B on one H100 (no internet needed; needs torch, pydantic, typer, rich,
# safetensors, tokenizers, numpy; datasets and transformers for the tests / the HF step). From the repo root:
#
#   OUT=/path/to/results bash exports/train_engine_0.5B/scripts/gpu_check.sh
#
# 0. pytest:   the engine's GPU tier first: the tests marked gpu, skipped on a CPU (MARKS="" runs the whole suite;
#              on the H200 that is over 10 minutes, mostly compiling)
# 1. bench:    the full 0.5B config, seq 4096, micro batch 4, random tokens, 3 warm-up + 10 timed steps
# 2. pretrain: 200 steps on the shipped corpus, seq 4096, global batch 8 = micro 4 x accum 2, bf16 compute,
#              fp32 master weights / grads / AdamW state, the default ops; JSONL log + summary; a checkpoint at
#              the end (under $CKPT, default /tmp: 5 GB), exported to HF and reloaded in transformers
# Writes into $OUT: gpu_check_summary.json (the numbers to quote), train.jsonl (the step log),
# train_summary.json, bench.json, hf_check.json, pytest.txt and each step's log.
# Each step runs even if an earlier one failed; the summary records every exit code, and the script exits 1 if any failed.
# A plumbing check of this script on a CPU: OUT=/tmp/x MODEL=tiny STEPS=3 SEQ=64 MB=2 GBS=4 PYTEST=0 bash ...
set -uo pipefail
OUT=${OUT:?set OUT to the results directory}
CKPT=${CKPT:-/tmp/forge_gpu_check_ckpt}
MODEL=${MODEL:-minicpm4-0.5b} STEPS=${STEPS:-200} SEQ=${SEQ:-4096} MB=${MB:-4} GBS=${GBS:-8} PYTEST=${PYTEST:-1} MARKS=${MARKS-gpu}
engine=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=$(cd "$engine/../.." && pwd)
mkdir -p "$OUT"
rm -rf "$CKPT" "$CKPT.hf"
export PYTHONPATH="$engine/src:$root${PYTHONPATH:+:$PYTHONPATH}" FORGE_ENGINE_PROGRESS=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$root"
py=${PYTHON:-python3}
declare -A rc

run() {  # run NAME CMD...: stdout+stderr to $OUT/NAME.log, exit code to rc[NAME]
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  rc[$name]=$?
  echo "   exit ${rc[$name]} after $((SECONDS - t0)) s"
  tail -n 3 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/nvidia_smi.txt" 2>&1

if [ "$PYTEST" = 1 ]; then
  run pytest "$py" -m pytest exports/train_engine_0.5B/tests -v -p no:cacheprovider -rs --durations=20 -m "$MARKS"
  cp "$OUT/pytest.log" "$OUT/pytest.txt"
fi

run bench "$py" -m train_engine_0_5b bench --model "$MODEL" --seq-length "$SEQ" --micro-batch-size "$MB" \
  --steps 10 --warmup 3 --json "$OUT/bench.json"

run pretrain "$py" -m train_engine_0_5b pretrain --model "$MODEL" --num-steps "$STEPS" --global-batch-size "$GBS" \
  --micro-batch-size "$MB" --seq-length "$SEQ" --lr 1e-3 --min-lr 1e-4 --warmup-steps 20 --lr-schedule wsd \
  --save-dir "$CKPT" --log-file "$OUT/train.jsonl" --summary-json "$OUT/train_summary.json"

if "$py" -c "import transformers" 2>/dev/null; then
  run export_hf "$py" -m train_engine_0_5b export-hf --checkpoint "$CKPT" --out "$CKPT.hf"
  run hf_check "$py" - "$CKPT" "$CKPT.hf" "$OUT/hf_check.json" <<'PY'
"""The exported checkpoint reproduces the engine's logits in transformers (fp32, TF32 off)."""
import json, sys
from pathlib import Path
import torch, transformers
from train_engine_0_5b.core import checkpoint as ckpt
from train_engine_0_5b.model import build_model, load_weights
from train_engine_0_5b.model_config import MiniCPMConfig
from train_engine_0_5b.ops.registry import OpSelection, resolve
torch.backends.cuda.matmul.allow_tf32 = False
loaded = ckpt.load(Path(sys.argv[1]))
cfg = MiniCPMConfig(**loaded.state["config"]["model"])
device = "cuda" if torch.cuda.is_available() else "cpu"
engine = build_model(cfg, resolve(OpSelection(attention="reference"), device, torch.float32), device, torch.float32)
load_weights(engine, loaded.master)
ids = torch.randint(0, 4096, (2, 256), device=device)
with torch.no_grad():
    want = engine(ids)
del engine
hf = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).to(device)
with torch.no_grad():
    got = hf(input_ids=ids).logits
rel = ((got - want).abs().max() / want.abs().max()).item()
result = {"class": type(hf).__name__, "max_rel_err_logits": rel, "ok": rel <= 1e-4}
Path(sys.argv[3]).write_text(json.dumps(result, indent=2) + "\n")
print(result)
sys.exit(0 if result["ok"] else 1)
PY
else
  echo "transformers is not installed: HF export check skipped" | tee "$OUT/hf_check.log"
fi
rm -rf "$CKPT" "$CKPT.hf"

rcs=""
for k in "${!rc[@]}"; do rcs+="\"$k\": ${rc[$k]}, "; done
"$py" - "$OUT" "{${rcs%, }}" "$MODEL" "$SEQ" "$GBS" "$MB" <<'PY'
"""gpu_check_summary.json: the numbers the issue's closing note quotes."""
import json, platform, statistics, sys
from pathlib import Path
import torch
out, rcs = Path(sys.argv[1]), json.loads(sys.argv[2])
model, seq, gbs, mb = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def median(values):  # None where the engine logs none (mfu on a CPU: no peak)
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None
def read(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
log = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()] if (out / "train.jsonl").is_file() else []
timed = [r for r in log if r["step"] > 10] or log  # past the first steps' one-time costs
summary = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "python": platform.python_version(), "exit_codes": rcs,
    "bench": read("bench.json"),
    "train": None if not log else {
        "model": model, "seq_length": seq, "global_batch_size": gbs, "micro_batch_size": mb,
        "steps": len(log), "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
        "loss_min": min(r["loss"] for r in log),
        "loss_mean_first_10": statistics.mean(r["loss"] for r in log[:10]),
        "loss_mean_last_10": statistics.mean(r["loss"] for r in log[-10:]),
        **{f"{k}_median": median(r.get(k) for r in timed) for k in ("step_time_s", "tokens_per_s", "mfu")},
        **{k: (read("train_summary.json") or {}).get(k) for k in ("peak_mem_gib", "dtype", "device", "world_size")},
        "mfu_formula": "DESIGN.md (Megatron-LM v0.15 FLOPs, causal halving, true vocab), peak 989.4 TFLOP/s",
    },
    "hf_check": read("hf_check.json"),
}
(out / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
PY
failed=""
for k in "${!rc[@]}"; do [ "${rc[$k]}" = 0 ] || failed+=" $k"; done
[ -z "$failed" ] || { echo "gpu_check: failed:$failed" >&2; exit 1; }
