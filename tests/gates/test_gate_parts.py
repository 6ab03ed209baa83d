"""Pieces of M5 and M6 that need no engine run: corpus cases, the loss-curve statistic and its
verdict rule, the MFU part on CPU, cutting a schedule for M6's reference at steps // 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gates.case import ScheduleSpec, make_spec
from gates.case_data import corpus_batches
from gates.context import GateRun
from gates.launch import Engine
from gates.m5_long_train import engine_model, loss_curve, mfu_part
from gates.m6_checkpoint import truncated_spec
from gates.model_config import preset
from gates.runner import GateOptions
from gates.stacks.torch_ref.optim import lr_at

BASE = Path(__file__).parents[1] / "redteam" / "engines" / "base"


def test_corpus_batches_are_real_shifted_text():
    spec = make_spec("tiny", steps=3, world_size=2, micro_batch_size=2, seq_length=32, seed=5)
    b = corpus_batches(spec, 5)
    assert b["input_ids"].shape == (3, 2, 2, 32) == b["labels"].shape
    assert torch.equal(b["input_ids"][..., 1:], b["labels"][..., :-1])
    assert int(b["input_ids"].max()) < 4096 and int(b["labels"].min()) >= 0
    assert torch.equal(b["input_ids"], corpus_batches(spec, 5)["input_ids"])
    assert not torch.equal(b["input_ids"], corpus_batches(spec, 6)["input_ids"])


def gate_run(**opts) -> GateRun:
    return GateRun("m5_long_train", Engine(BASE, "rt_base"), GateOptions(**opts))


def test_loss_curve_window_statistic():
    g = gate_run(long_train_window=4, long_train_threshold=0.01)
    ref = torch.linspace(8.0, 6.0, 20, dtype=torch.float64)
    part, loc = loss_curve(g, ref * 1.001, ref)
    assert part.verdict == "passed" and loc is None
    assert part.numbers["window_mean_rel_diff"] == pytest.approx(1e-3)
    eng = ref.clone()
    eng[-4:] *= 1.05  # the trailing window drifts by 5 %
    part, loc = loss_curve(gate_run(long_train_window=4), eng, ref)
    assert part.verdict == "failed" and loc.step == 16 and part.numbers["first_step_over_threshold"] == 16
    eng = ref.clone()
    eng[3] *= 1.5  # an early spike outside the window: recorded, not failing
    part, _ = loss_curve(gate_run(long_train_window=4), eng, ref)
    assert part.verdict == "passed" and part.numbers["first_step_over_threshold"] == 3


def test_mfu_is_unsupported_on_cpu_and_model_comes_from_the_engine_spec():
    part = mfu_part(gate_run(), preset("minicpm4-0.5b"))
    assert part.verdict == "unsupported" and "GPU only" in part.message
    model, source = engine_model(BASE, preset("minicpm4-0.5b"))
    assert model.hidden_size == 64 and source == "model_spec.toml"
    model, source = engine_model(BASE / "nowhere", preset("minicpm4-0.5b"))
    assert model.name == "minicpm4-0.5b" and "case" in source


@pytest.mark.parametrize("steps, sched, cut", [
    (4, ScheduleSpec(kind="wsd", warmup_steps=1), True),
    (8, ScheduleSpec(kind="wsd", warmup_steps=2, decay_steps=2), True),
    (6, ScheduleSpec(kind="constant", warmup_steps=3), True),
    (8, ScheduleSpec(kind="cosine", warmup_steps=1), False),
])
def test_truncated_schedule_keeps_every_lr(steps, sched, cut):
    spec = make_spec("tiny", steps=steps, schedule=sched)
    half = truncated_spec(spec, steps // 2)
    assert (half is not None) == cut
    if half is not None:
        assert [lr_at(t, half.steps, half.optimizer, half.schedule) for t in range(1, steps // 2 + 1)] == \
               [lr_at(t, steps, spec.optimizer, spec.schedule) for t in range(1, steps // 2 + 1)]


def test_mfu_part_runs_the_engine_bench_and_recomputes_mfu(monkeypatch):
    """The GPU path end to end, with `cuda` faked in the gate process: the base engine's bench runs on
    CPU, so the measured MFU is tiny and the part fails with its numbers (never passes by default)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    g = GateRun("m5_long_train", Engine(BASE, "rt_base"),
                GateOptions(device="cuda", bench_seq_length=32, bench_micro_batch_size=1, bench_steps=2))
    try:
        part = mfu_part(g, preset("minicpm4-0.5b"))
    finally:
        g.cleanup()
    assert part.verdict == "failed", part.message
    n = part.numbers
    assert n["model"] == "tiny" and n["model_source"] == "model_spec.toml" and n["tokens_per_s"] > 0
    assert n["mfu"] == pytest.approx(preset("tiny").flops_per_token(32) * n["tokens_per_s"] / 989.4e12)
    assert [c.role for c in g.report.commands] == ["engine bench"]


@pytest.mark.parametrize("dtype, lr", [("float32", 1e-3), ("float64", 1e-3), ("bfloat16", 1e-4)])
def test_m3_runs_low_precision_cases_at_the_low_lr(monkeypatch, dtype, lr):
    """bf16 M3 cases use peak LR 1e-4 (at 1e-3 the 0.5B's step-4 grad norm is chaotic: gates/m3_optimizer.py)."""
    from gates import m3_optimizer

    seen = {}

    def fake_make_case(self, label="case", **fields):
        seen.update(fields)
        raise RuntimeError("stop after the case spec")

    monkeypatch.setattr(GateRun, "make_case", fake_make_case)
    g = GateRun("m3_optimizer", Engine(BASE, "rt_base"), GateOptions(dtype=dtype))
    with pytest.raises(RuntimeError, match="stop after"):
        m3_optimizer.run(g)
    spec = make_spec("tiny", dtype=dtype, **seen)
    assert spec.optimizer.lr == lr and spec.grad_accum == 1 and spec.schedule.warmup_steps == 2
