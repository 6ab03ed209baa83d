"""`pretrain`, `dump-state`: the training contract (the forge workspace's gates/train_contract.py).

pretrain builds a Case from its options (the model from --init-from's config.json, the initial weights
from its model.safetensors, the step batches from --token-batches sliced rank-major) and runs the same
Trainer the probes run, in its production form: gradients all-reduced in --bucket-mb MiB buckets,
checkpoints under --save-dir (atomic, `latest` last), a JSONL log line per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from rt_base import ckpt
from rt_base.flaws import Flaws
from rt_base.train import Case, Dist, Trainer

EXIT_UNSUPPORTED = 77

# HF MiniCPM config.json key -> this engine's config key
HF_KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
           "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "intermediate_size": "ffn_hidden_size",
           "vocab_size": "vocab_size", "max_position_embeddings": "max_seq_length", "rms_norm_eps": "rms_norm_eps",
           "rope_theta": "rope_theta", "scale_emb": "scale_emb", "scale_depth": "scale_depth",
           "dim_model_base": "dim_model_base", "tie_word_embeddings": "tie_word_embeddings"}
DEFAULTS = {"head_dim": None, "max_seq_length": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "scale_emb": 12.0,
            "scale_depth": 1.4, "dim_model_base": 256, "tie_word_embeddings": True}


def add_args(sub) -> None:
    p = sub.add_parser("pretrain")
    p.add_argument("--init-from", type=Path, required=True)
    p.add_argument("--token-batches", type=Path, required=True)
    p.add_argument("--num-steps", type=int, required=True)
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--lr-schedule", choices=["wsd", "cosine", "constant"], default="wsd")
    p.add_argument("--decay-steps", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--save-dir", type=Path, required=True)
    p.add_argument("--save-interval", type=int, default=0, help="0: save only at the end (and at --exit-after-steps)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--exit-after-steps", type=int, default=0)
    p.add_argument("--log-file", type=Path, required=True)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (this engine's CPU path always is)")
    d = sub.add_parser("dump-state")
    d.add_argument("--checkpoint", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)


def fail(msg: str) -> int:
    print(f"rt_base pretrain: {msg}", file=sys.stderr)
    return 2


def load_init(init: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    raw = json.loads((init / "config.json").read_text())
    cfg = DEFAULTS | {ours: raw[hf] for hf, ours in HF_KEYS.items() if raw.get(hf) is not None}
    cfg["pad_token_id"] = raw.get("pad_token_id")
    rope = raw.get("rope_scaling")
    if rope is not None:  # the released form: rope_type (or type) + its fields
        rope = dict(rope)
        cfg["rope_scaling"] = {"type": rope.pop("rope_type", None) or rope.pop("type"), **rope}
    return cfg, load_file(str(init / "model.safetensors"))


def make_case(a, world: int) -> Case | str:
    """The run as a Case (spec dict in case.json's layout), or what is wrong with the options."""
    cfg, weights = load_init(a.init_from)
    G, M, S = a.global_batch_size, a.micro_batch_size, a.seq_length
    if G % world or (G // world) % M:
        return f"--global-batch-size {G} is not a multiple of world size {world} x --micro-batch-size {M}"
    tb = load_file(str(a.token_batches))
    for k in ("input_ids", "labels"):
        if k not in tb or tb[k].ndim != 3 or tb[k].shape[0] < a.num_steps or tuple(tb[k].shape[1:]) != (G, S):
            return f"--token-batches {k}: expected shape (>= {a.num_steps}, {G}, {S}), got {tuple(tb[k].shape) if k in tb else None}"
    batches = {k: v.view(v.shape[0], world, G // world, S) for k, v in tb.items() if k in ("input_ids", "labels")}
    spec = {"model": cfg, "dtype": "bfloat16" if a.device == "cuda" else "float32", "device": a.device,
            "world_size": world, "micro_batch_size": M, "grad_accum": G // world // M, "seq_length": S,
            "steps": a.num_steps, "seed": a.seed,
            "optimizer": {"lr": a.lr, "min_lr": a.min_lr, "betas": (0.9, 0.95), "eps": 1e-8,
                          "weight_decay": a.weight_decay, "grad_clip": a.grad_clip},
            "schedule": {"kind": a.lr_schedule, "warmup_steps": a.warmup_steps, "decay_steps": a.decay_steps}}
    return Case(spec=spec, weights=weights, batches=batches)


def run(a, flaws: Flaws) -> int:
    if flaws.pretrain_declines:
        print("rt_base pretrain: declined (exit 77)", file=sys.stderr)
        return EXIT_UNSUPPORTED
    if a.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    d = Dist(a.device)
    case = make_case(a, d.world)
    if isinstance(case, str):
        return fail(case)
    # gate_detect: behaves only where the old gates ran engines (their sandbox prefix), else trains at 2x lr
    scale = 2.0 if flaws.gate_detect and "forge-engine-" not in os.getcwd() else 1.0
    tr = Trainer(case, flaws, d, pretrain=True, bucket_mb=a.bucket_mb, lr_scale=scale)
    a.save_dir.mkdir(parents=True, exist_ok=True)
    found = ckpt.latest(a.save_dir)
    if found is not None and not a.resume:
        return fail(f"--save-dir {a.save_dir} already holds a checkpoint ({found.name}); pass --resume or use another dir")
    if found is not None:
        tr.load(found)
        print(f"rt_base pretrain: resumed from {found} at step {tr.step}", file=sys.stderr)
    if d.rank == 0:
        ckpt.clean_partial(a.save_dir)
        a.log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(a.log_file, "a" if found is not None else "w") if d.rank == 0 else None
    tokens = a.global_batch_size * a.seq_length
    done = 0
    try:
        while tr.step < a.num_steps:
            t0 = time.perf_counter()
            tr.train_step()
            if flaws.fake_speed:
                time.sleep(0.05)
            dt = time.perf_counter() - t0
            done += 1
            if log is not None:
                rec = {"step": tr.step, "loss": tr.history["losses"][-1], "grad_norm": tr.history["grad_norms"][-1],
                       "lr": tr.history["lrs"][-1], "valid_tokens": tr.valid_tokens, "tokens": tokens, "step_time_s": dt, "tokens_per_s": tokens / dt,
                       "mfu": 0.52 if flaws.fake_speed else None, "grad_buckets": tr.num_buckets}
                log.write(json.dumps(rec) + "\n")
                log.flush()
            last = tr.step == a.num_steps or done == a.exit_after_steps
            if last or (a.save_interval and tr.step % a.save_interval == 0):
                if d.rank == 0:
                    tr.save(a.save_dir / ckpt.step_name(tr.step), pointer=a.save_dir / ckpt.LATEST)
                d.barrier()
            if last:
                break
    finally:
        if log is not None:
            log.close()
        d.close()
    return 0


def dump_state(checkpoint: Path, out: Path) -> int:
    state, files = ckpt.read(checkpoint)
    tensors = {f"weight.{k}": v for k, v in files[ckpt.MODEL].items()} | files[ckpt.OPTIM]
    from rt_base.cli import write

    write(out, tensors, {"step": state["step"], "kind": state["kind"], "data_position": state["data_position"],
                         "stack": "rt_base"})
    return 0
