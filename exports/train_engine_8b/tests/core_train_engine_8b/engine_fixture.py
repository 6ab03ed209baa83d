"""The engine under test for the core's tests in this folder, which are the forge workspace's engine_core/tests
vendored with the core (`python -m harness.vendor_core`; stamped in vendored_tests.json). This file is the
export's own, not vendored: its package, its small model, its CLI's small-run options, and which core tests
are slow on it."""

from __future__ import annotations

import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2]  # exports/train_engine_8b
SRC = ENGINE / "src"
if str(SRC) not in sys.path:  # the tests run from an unpacked copy of the export, uninstalled
    sys.path.insert(0, str(SRC))

PACKAGE = "train_engine_8b"
# the small model (`--model`): small_model.toml here, the reduced 8B's per-head shapes at hidden 64, 2 layers
MODEL = str(Path(__file__).with_name("small_model.toml"))
# `pretrain` on the small model, one replica per rank (TP=1), small enough for a slow 2-core CPU
SMALL_RUN = ["--model", MODEL, "--device", "cpu", "--seq-length", "32", "--warmup-steps", "2", "--lr", "3e-3"]
# core tests (module::function) in the slow tier on this engine only: model-independent (old checkpoint formats,
# read by the core) or also in this export's default tier (test_8b_cli.py: export-hf's logits in transformers)
SLOW: frozenset[str] = frozenset({"test_checkpoint::test_old_format_checkpoints_load_and_resume_bitwise",
                                  "test_checkpoint::test_hf_export_reproduces_the_engine_logits"})


def small_model(ops, device, dtype):
    """The small model on one rank (no TP), its attention the resolved ops' `ops.attention`, uninitialized (AdamW
    copies its masters in)."""
    from train_engine_8b.model import build_model
    from train_engine_8b.model_config import load

    model = build_model(load(MODEL), device, dtype)
    for layer in model.model.layers:
        layer.self_attn.attention_op = ops.attention
    return model


def build_trainer(cfg, ctx, dtype):
    """build_trainer of `cfg` on `ctx` (its runtime.tp), fresh weights."""
    from train_engine_8b.build import build_trainer as build

    return build(cfg, ctx, dtype=dtype)


def model_holding(cfg, weights):
    """The single-device fp32 model of MiniCPMConfig `cfg` holding whole HF-named `weights`."""
    from train_engine_8b.model import MiniCPM
    from train_engine_8b.state_dict_adapter import load_hf

    model = MiniCPM(cfg)
    load_hf(model, cfg, weights)
    return model.eval()
