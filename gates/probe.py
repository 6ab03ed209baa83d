"""The probe contract: what a stack is asked, where it answers, and what its answers are called.

    STACK probe forward|backward|steps|checkpoint --case DIR --out DIR

writes `DIR/tensors.safetensors` and `DIR/metrics.json` and exits 0; a stack that cannot do a probe
exits `EXIT_UNSUPPORTED` (the gate then reports `unsupported`, never `passed`). Any other non-zero
exit is an error.

Tensor names per probe (L = num_layers; NAME = an HF MiniCPM parameter name):
- forward:    `logits` (rows, seq, vocab), `loss` (), `hidden_states.{0..L}` (rows, seq, hidden):
              the residual stream after the scaled embedding (0) and after each layer (i);
              computed on the global batch of step 0.
- backward:   `loss` (), `grad.NAME` (float32, or float64 in fp64 cases) for every parameter: the
              gradient of step 0's training loss (global token mean, see gates/case.py).
- steps:      `losses` (steps,), `grad_norms` (steps,) before clipping, `lrs` (steps,), and
              `weight.NAME`: the master weights after the last step.
- checkpoint: same names as `steps`, but the stack saves a checkpoint after `steps // 2` steps under
              `--out DIR/ckpt`, and resumes from it (fresh model, optimizer, data cursor, RNG) for the rest.

`metrics.json` holds at least {"probe", "stack", "time_s"}. Under torchrun (WORLD_SIZE > 1), rank 0
writes the outputs; every rank reads only its rows of each step.

Per-rank outputs (`steps` under torchrun): every process r also writes `DIR/ranks/rank{r}.safetensors`
with `loss_sums` (steps,) float64, the sum of token cross-entropy over the rows it trained on in each
step (at that step's weights), and `valid_tokens` (steps,) int64, the count of its labels != -100. The
gate requires a file from every rank and ties each to that rank's rows (gate M4): a rank that did no
work, or another rank's work, shows there even when the summed gradient is right. The reference's `steps` and
`checkpoint` answers carry what every rank's `loss_sums` must be, as `rank_loss_sums` (steps, world_size),
and `grad_norms_exact` (steps,) float64: the norm of the same gradients as `grad_norms`, accumulated in
float64 (the yardstick of gates/policies.py's float64-twin rule for grad norms).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROBES = ("forward", "backward", "steps", "checkpoint")
EXIT_OK = 0
EXIT_UNSUPPORTED = 77  # the automake "skip" convention: distinct from errors (1) and usage errors (2)
TENSORS_FILE = "tensors.safetensors"
METRICS_FILE = "metrics.json"
RANKS_DIR = "ranks"
RANK_NAMES = ("loss_sums", "valid_tokens")
REFERENCE_RANK_SUMS = "rank_loss_sums"  # a reference-only name (see above)
REFERENCE_EXACT_NORMS = "grad_norms_exact"  # a reference-only name (see above)
REFERENCE_NAMES = (REFERENCE_RANK_SUMS, REFERENCE_EXACT_NORMS)  # the reference's answers beyond the contract's


def rank_file(out: str | Path, rank: int) -> Path:
    """Where process `rank` writes its per-rank outputs."""
    return Path(out) / RANKS_DIR / f"rank{rank}.safetensors"


def write_outputs(out: str | Path, tensors: dict[str, torch.Tensor], metrics: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / TENSORS_FILE))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def read_outputs(out: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads only the two files the contract names."""
    out = Path(out)
    return load_file(str(out / TENSORS_FILE)), json.loads((out / METRICS_FILE).read_text())


def expected_names(probe: str, param_names: list[str], num_layers: int) -> set[str]:
    if probe == "forward":
        return {"logits", "loss"} | {f"hidden_states.{i}" for i in range(num_layers + 1)}
    if probe == "backward":
        return {"loss"} | {f"grad.{n}" for n in param_names}
    if probe in ("steps", "checkpoint"):
        return {"losses", "grad_norms", "lrs"} | {f"weight.{n}" for n in param_names}
    raise ValueError(f"unknown probe {probe!r}; one of {PROBES}")
