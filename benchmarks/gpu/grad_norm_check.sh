set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/carried/site-packages .whl/*.whl .whl-base/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/carried/site-packages:$PWD
bash agent-loop.sh case new --model minicpm4-0.5b --dtype bfloat16 --device cuda --seq-length 1024 --micro-batch-size 1 --grad-accum 2 --steps 2 --seed 3 --out /tmp/c
for s in torch megatron; do
  for p in backward steps; do
    if [ $s = torch ]; then python3 -m gates.stacks.torch_ref probe $p --case /tmp/c --out /tmp/o_${s}_$p > /tmp/log_${s}_$p 2>&1; else python3 -m gates.stacks.megatron probe $p --case /tmp/c --out /tmp/o_${s}_$p > /tmp/log_${s}_$p 2>&1; fi
    echo "$s $p rc=$?"; tail -2 /tmp/log_${s}_$p
  done
done
python3 - <<'PY'
from safetensors.torch import load_file
import torch
for s in ("torch", "megatron"):
    b = load_file(f"/tmp/o_{s}_backward/tensors.safetensors"); st = load_file(f"/tmp/o_{s}_steps/tensors.safetensors")
    g = [v.double() for k, v in b.items() if k.startswith("grad.")]
    own = torch.sqrt(sum((x * x).sum() for x in g))
    emb = b["grad.model.embed_tokens.weight"].double().norm()
    print(s, "norm of its backward grads", float(own), "embed grad norm", float(emb), "steps grad_norms", st["grad_norms"].tolist(), "losses", st["losses"].tolist())
PY
