"""The training contract: how gates run an engine's own `pretrain`, the path users train with.

    ENGINE pretrain --init-from DIR --token-batches FILE
                    --num-steps T --global-batch-size G --micro-batch-size M --seq-length S
                    --lr X --min-lr X --warmup-steps N --lr-schedule wsd|cosine|constant [--decay-steps N]
                    --weight-decay X --grad-clip X --bucket-mb X --seed N --device cpu|cuda
                    --save-dir DIR [--save-interval K] [--resume] [--exit-after-steps K] [--deterministic]
                    --log-file FILE  [the spec's production flags]
    ENGINE export-hf  --checkpoint DIR --out DIR
    ENGINE dump-state --checkpoint DIR --out DIR

- `--init-from DIR`: a Hugging Face MiniCPM checkpoint directory, as users continue pretraining from one:
  `config.json` (MiniCPM keys, `to_hf_minicpm_config`) and `model.safetensors` (HF MiniCPM names,
  float32). The model config comes from it; the weights are the run's initial master weights.
- `--token-batches FILE`: safetensors with `input_ids` and `labels`, int64, shape (T', G, S) with T' >= T.
  Step t (1-based) trains on `[t-1]`; labels of -100 are ignored; the loss of a step is the global token
  mean (gates/case.py). Under torchrun with W processes, rank r trains rows [r*G/W, (r+1)*G/W) of every
  step, M rows per micro batch, in order. A resumed run continues at the batch after its checkpoint.
- No `--dtype`, `--compile`, ...: the engine's defaults for the device are what users get, so they are
  what is checked and timed; a spec may name extra production flags (`GateOptions.pretrain_args`).
- The log: JSONL, one object per optimizer step with at least `step` (1-based), `loss`, `grad_norm`
  (before clipping), `lr` and `valid_tokens` (labels != -100 in the step's global batch: which batch the
  step trained on). The gate reads only these; the engine's own timing fields are printed beside the
  gate's figures and never decide a verdict. Each step's line is written (and flushed) once the step's loss
  is known, not held for later: M5's speed part times steps by when their lines appear (gates/line_clock.py).
- `--exit-after-steps K`: stop after K steps of this invocation, with a checkpoint; `--resume` then
  continues from `--save-dir`'s newest checkpoint as if never stopped (bit for bit on the same hardware).
- `--deterministic`: deterministic kernels, so two processes on the same data give the same bits; M8 passes it
  (its comparisons are bitwise), every other gate runs the engine's defaults.
- `dump-state`: writes `tensors.safetensors` with `weight.NAME` (float32 master weights), `exp_avg.NAME`
  and `exp_avg_sq.NAME` (AdamW moments) for every parameter, and `metrics.json` with at least {"step"}.
  `--checkpoint` names a step directory or a save dir (its newest checkpoint), as for `export-hf`.

Exit 77 from any of these: the engine declines. Where the stage requires the gate that is `failed`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gates.case import Case, CaseSpec
from gates.model_config import MiniCPMConfig, to_hf_minicpm_config

SERIES = {"loss": "losses", "grad_norm": "grad_norms", "lr": "lrs", "valid_tokens": "valid_tokens"}  # log key -> name


class LogError(ValueError):
    """A log that breaks the contract (missing steps or keys, non-numbers); the message says where."""


def write_init_dir(out: Path, model: MiniCPMConfig, weights: dict[str, torch.Tensor]) -> Path:
    """A HF MiniCPM checkpoint directory with these weights (float32 unless they are float64)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_hf_minicpm_config(model), indent=2) + "\n")
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in weights.values()) else torch.float32
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def write_token_batches(path: Path, case: Case) -> Path:
    """The case's batches as (steps, global_rows, seq): rank-major rows, as DP ranks slice them."""
    b = case.batches
    save_file({k: b[k].flatten(1, 2).contiguous() for k in ("input_ids", "labels")}, str(path))
    return path


def pretrain_args(spec: CaseSpec, init_dir: Path, batches: Path, log_file: Path, save_dir: Path,
                  bucket_mb: float = 25.0, extra: list[str] | None = None) -> list[str]:
    """`pretrain` argv (after the engine's module) for a case: its optimizer, schedule and batch layout."""
    o, s = spec.optimizer, spec.schedule
    args = ["pretrain", "--init-from", str(init_dir), "--token-batches", str(batches),
            "--num-steps", str(spec.steps), "--global-batch-size", str(spec.global_batch_rows),
            "--micro-batch-size", str(spec.micro_batch_size), "--seq-length", str(spec.seq_length),
            "--lr", repr(o.lr), "--min-lr", repr(o.min_lr), "--warmup-steps", str(s.warmup_steps),
            "--lr-schedule", s.kind, "--weight-decay", repr(o.weight_decay), "--grad-clip", repr(o.grad_clip),
            "--bucket-mb", repr(bucket_mb), "--seed", str(spec.seed), "--device", spec.device,
            "--save-dir", str(save_dir), "--log-file", str(log_file)]
    if s.decay_steps is not None:
        args += ["--decay-steps", str(s.decay_steps)]
    if tuple(o.betas) != (0.9, 0.95) or o.eps != 1e-8:
        raise ValueError("the training contract passes no betas / eps: cases for pretrain keep (0.9, 0.95) and 1e-8")
    return args + list(extra or [])


def read_log(path: Path, first: int, last: int) -> dict[str, torch.Tensor]:
    """Steps first..last (1-based, inclusive) of a JSONL log as float64 series named as the probe contract
    names them (`losses`, `grad_norms`, `lrs`), plus `valid_tokens`. A step logged twice keeps its last line (a resumed run may
    repeat steps after its checkpoint); a line that is not JSON at all is a write cut by a kill and is skipped (every
    step still needs a whole line). Raises LogError naming the first problem."""
    if not path.is_file():
        raise LogError(f"no log at {path} (--log-file)")
    rows: dict[int, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        try:
            step = int(rec["step"])
        except (KeyError, TypeError, ValueError):
            raise LogError(f"{path.name} line {n} is not a JSON object with an integer `step`: {line[:120]!r}") from None
        rows[step] = rec
    missing = [t for t in range(first, last + 1) if t not in rows]
    if missing:
        raise LogError(f"{path.name} has no line for step {missing[0]} ({len(missing)} of steps {first}..{last} missing)")
    out: dict[str, list[float]] = {v: [] for v in SERIES.values()}
    for t in range(first, last + 1):
        for key, name in SERIES.items():
            value = rows[t].get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise LogError(f"{path.name} step {t}: `{key}` is {value!r}, not a number")
            if not math.isfinite(value):
                raise LogError(f"{path.name} step {t}: `{key}` is {value}")
            out[name].append(float(value))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def read_state(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """`dump-state`'s two files."""
    return load_file(str(out / "tensors.safetensors")), json.loads((out / "metrics.json").read_text())
