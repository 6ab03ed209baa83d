"""The engine under test for the core's tests in this folder, which are the forge workspace's engine_core/tests
vendored with the core (`python -m harness.vendor_core`; stamped in vendored_tests.json). This file is the
export's own, not vendored: its package, its small model, its CLI's small-run options, and which core tests
are slow on it."""

from __future__ import annotations

import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2]  # exports/train_engine_0.5B
SRC = ENGINE / "src"
if str(SRC) not in sys.path:  # the tests run from an unpacked copy of the export, uninstalled
    sys.path.insert(0, str(SRC))

PACKAGE = "train_engine_0_5b"
MODEL = "tiny"  # the small model's preset (hidden 64, 2 layers, tied, vocab 4096: the shipped tokenizer's)
# `pretrain` on the small model, small enough for a slow 2-core CPU
SMALL_RUN = ["--model", MODEL, "--device", "cpu", "--seq-length", "32", "--warmup-steps", "2", "--lr", "3e-3"]
SLOW: frozenset[str] = frozenset()  # core tests (module::function) in the slow tier on this engine only


def small_model(ops, device, dtype):
    """The tiny preset's model with the resolved ops `ops`, uninitialized (AdamW copies its masters in)."""
    from train_engine_0_5b.model import build_model
    from train_engine_0_5b.model_config import preset

    return build_model(preset(MODEL), ops, device, dtype)


def build_trainer(cfg, ctx, dtype):
    """build_trainer of `cfg` on `ctx` with the device's default ops, fresh weights."""
    from train_engine_0_5b.build import build_trainer as build
    from train_engine_0_5b.ops.registry import OpSelection, resolve

    return build(cfg, ctx, resolve(OpSelection(), ctx.device.type, dtype), dtype=dtype)


def model_holding(cfg, weights):
    """The single-device fp32 model of MiniCPMConfig `cfg` (default ops) holding whole HF-named `weights`."""
    import torch

    from train_engine_0_5b.model import build_model, load_weights
    from train_engine_0_5b.ops.registry import OpSelection, resolve

    model = build_model(cfg, resolve(OpSelection(), "cpu"), "cpu", torch.float32)
    load_weights(model, weights)
    return model.eval()
