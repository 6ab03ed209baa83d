"""The engine under test for the core's tests in this folder, which are the forge workspace's engine_core/tests
vendored with the core (`python -m harness.vendor_core`; stamped in vendored_tests.json). This file is the
export's own, not vendored: its package, its small model and its CLI's small-run options."""

from __future__ import annotations

import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2]  # exports/train_engine_8b
SRC = ENGINE / "src"
if str(SRC) not in sys.path:  # the tests run from an unpacked copy of the export, uninstalled
    sys.path.insert(0, str(SRC))

PACKAGE = "train_engine_8b"
# `pretrain` on the small model, one replica per rank (TP=1), small enough for a slow 2-core CPU: the reduced 8B
# (the 8B's per-head shapes, hidden 256, 2 layers, vocab 4096: the shipped tokenizer's)
SMALL_RUN = ["--model", "minicpm4-8b-reduced", "--device", "cpu", "--seq-length", "32", "--warmup-steps", "2",
             "--lr", "3e-3"]


def small_model(ops, device, dtype):
    """The reduced 8B on one rank (no TP), its attention the resolved ops' `ops.attention`, uninitialized (AdamW
    copies its masters in)."""
    from train_engine_8b.model import build_model
    from train_engine_8b.model_config import preset

    model = build_model(preset("minicpm4-8b-reduced"), device, dtype)
    for layer in model.model.layers:
        layer.self_attn.attention_op = ops.attention
    return model
