#!/usr/bin/env bash
# Repeats a short TP=2 `pretrain` of the reduced 8B under torchrun over gloo (CPU: 2 steps, then the final save)
# and counts the launches in which a rank aborts at teardown ("terminate called without an active exception",
# SIGABRT after "saved checkpoint"): seen in 1 of 60 launches on the 2-core CPU machine. Usage, from anywhere:
#   bash exports/train_engine_8b/scripts/teardown_loop.sh [LAUNCHES (60)] [WORK_DIR (a new temporary one)]
# Prints one line per launch and the totals; exits 1 if any launch failed. About 6 s a launch.
set -uo pipefail
n=${1:-60}
work=${2:-$(mktemp -d)}
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../src" && pwd)
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 FORGE_ENGINE_PROGRESS=0
python3 - "$work" <<'PY'
"""The inputs: a HF MiniCPM directory of the reduced 8B (fresh weights) and 2 token batches of 4 x 32."""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from train_engine_8b.minicpm.hf_config import to_hf_minicpm_config
from train_engine_8b.minicpm.init import init_weights
from train_engine_8b.model_config import preset
d, cfg = Path(sys.argv[1]), preset("minicpm4-8b-reduced")
(d / "init").mkdir(parents=True, exist_ok=True)
(d / "init" / "config.json").write_text(json.dumps(to_hf_minicpm_config(cfg), indent=2))
save_file({k: v.contiguous() for k, v in init_weights(cfg, 0.1, 1).items()}, str(d / "init" / "model.safetensors"))
ids = torch.randint(0, cfg.vocab_size, (2, 4, 32), generator=torch.Generator().manual_seed(1))
save_file({"input_ids": ids, "labels": ids.roll(-1, dims=-1)}, str(d / "batches.safetensors"))
PY
failed=0 aborted=0
for i in $(seq 1 "$n"); do
  rm -rf "$work/save" "$work/log.jsonl"
  timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node=2 -m train_engine_8b pretrain \
    --init-from "$work/init" --token-batches "$work/batches.safetensors" --num-steps 2 --global-batch-size 4 \
    --micro-batch-size 1 --seq-length 32 --lr 0.01 --min-lr 0.001 --warmup-steps 1 --lr-schedule wsd \
    --weight-decay 0.1 --grad-clip 1.0 --seed 3 --device cpu --tp 2 --save-dir "$work/save" \
    --log-file "$work/log.jsonl" > "$work/launch-$i.log" 2>&1
  rc=$?
  abort=$(grep -c "terminate called" "$work/launch-$i.log")
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
  [ "$abort" -ne 0 ] && aborted=$((aborted + 1))
  echo "launch $i: exit $rc, teardown abort: $abort"
done
echo "teardown_loop: $n launches, $failed failed, $aborted with a teardown abort (logs: $work)"
[ "$failed" -eq 0 ]
