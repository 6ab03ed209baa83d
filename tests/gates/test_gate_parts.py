"""Pieces of M5 and M6 that need no engine run: corpus cases, the loss-curve statistic and its
verdict rule, the MFU part on CPU, cutting a schedule for M6's reference at steps // 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gates.case import ScheduleSpec, make_spec
from gates.case_data import corpus_batches
from gates.context import GateRun, GateStop
from gates.launch import Engine, GateTimeout
from gates import m5_long_train
from gates.m5_long_train import loss_curve, speed_part
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


def test_mfu_is_unsupported_on_cpu_without_a_cpu_peak():
    part = speed_part(gate_run(), preset("minicpm4-0.5b"))
    assert part.verdict == "unsupported" and "GPU only" in part.message


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


# the speed part's options in these tests: N fixed at 3 (no sizing from the logged step times, no floor on the window),
# the window from step 5's line (the default settle) to step 8's
FIXED_N = dict(cpu_peak_tflops=1.0, mfu_threshold=0.0, speed_steps=3, speed_seq_length=32, speed_global_batch_size=4,
               speed_micro_batch_size=2, seed=1, speed_target_timed_s=0, speed_min_timed_s=0)


def fake_speed_runs(monkeypatch, walls: dict[str, float], gap: float = 0.5, loss_scale: float = 1.0, claim: float = 0.52,
                    arrivals=None):
    """PretrainBox.run, the gate's line clock and the reference replaced: each run 'takes' walls[name] seconds
    on the gate's clock, its log lines 'arrive' `gap` seconds apart (or at arrivals(steps) -> {step: time}), and
    it logs the losses 8 - 0.1 t (scaled for its own runs by loss_scale) with an engine-claimed MFU of `claim`
    and step time 0.25 s. Returns, per run, the save dirs that were still there when it started."""
    from gates.report import Command

    saves_seen: list[list[str]] = []

    def run(self, name, role, nproc=1, extra=None, bucket_mb=25.0, args=None):
        steps = int(args[args.index("--num-steps") + 1])
        self.g.report.commands.append(Command(role=role, argv=args, cwd=str(self.root), rc=0, time_s=walls[name]))
        lines = [f'{{"step": {t}, "loss": {(8 - 0.1 * t) * loss_scale}, "grad_norm": 1.0, "lr": 3e-4, '
                 f'"valid_tokens": 1, "step_time_s": 0.25, "mfu": {claim}}}' for t in range(1, steps + 1)]
        self.log(name).write_text("\n".join(lines) + "\n")
        saves_seen.append(sorted(d.name for d in self.root.glob("save-*")))  # earlier runs' checkpoints still here
        self.save_dir(name).mkdir()
        (self.save_dir(name) / "checkpoint").write_bytes(b"x")

    class ScriptedClock:
        def __init__(self, path):
            self.path, self.stamps = path, {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            steps = len(self.path.read_text().splitlines())
            self.stamps = arrivals(steps) if arrivals else {t: 100.0 + gap * t for t in range(1, steps + 1)}

    def reference(self, probe, case, twin=True, stack=None):
        # the engine's micro batches, torch's fused attention, no float32 twin: the check's cost
        assert (stack, twin, case.spec.micro_batch_size) == ("torch-sdpa", False, 2)
        return {"losses": torch.tensor([8 - 0.1 * t for t in range(1, case.spec.steps + 1)])}

    monkeypatch.setattr(m5_long_train.PretrainBox, "run", run)
    monkeypatch.setattr(m5_long_train, "LineClock", ScriptedClock)
    monkeypatch.setattr(GateRun, "reference_probe", reference)
    return saves_seen


def speed(**options):
    g = gate_run(**(FIXED_N | options))
    try:
        return speed_part(g, preset("tiny")), g
    finally:
        g.cleanup()


def test_speed_is_the_gates_clock_and_the_cases_flops(monkeypatch):
    """tokens/s = N x rows x seq / (arrival of line 8 - arrival of line 5) on the gate's clock; FLOPs from the case's
    model; the engine's own (absurd) MFU claim and step times are recorded and decide nothing; the run's wall
    (start-up and save included) gives only the whole-run figure beside it."""
    saves_seen = fake_speed_runs(monkeypatch, {"warm": 50.0, "timed": 20.0}, gap=0.5)
    part, g = speed()
    n = part.numbers
    assert part.verdict == "passed", part.message
    assert n["tokens_per_s"] == pytest.approx(3 * 4 * 32 / 1.5) and n["step_time_s"] == pytest.approx(0.5)
    assert n["timed_window_s"] == pytest.approx(1.5) and n["line_gap_median_s"] == pytest.approx(0.5)
    assert n["whole_run_tokens_per_s"] == pytest.approx(8 * 4 * 32 / 20.0) and n["wall_timed_s"] == 20.0
    assert n["flops_per_token"] == preset("tiny").flops_per_token(32)
    assert n["mfu"] == pytest.approx(n["flops_per_token"] * n["tokens_per_s"] / 1e12)
    assert '"mfu": 0.52' in n["engine_log_last_line"] and n["mfu"] < 1e-3
    assert n["engine_steps_sum_s_timed"] == pytest.approx(0.75) and n["engine_step_times_s_timed"] == " ".join(["0.25"] * 8)
    assert n["device"] == "cpu" and [c.role.split(",")[-1] for c in g.report.commands] == [" warm)", " timed)"]
    assert [int(c.argv[c.argv.index("--num-steps") + 1]) for c in g.report.commands] == [3, 8]
    assert (n["settle_steps"], n["timed_steps"], n["run_steps"]) == (5, 3, 8)
    assert n["loss_mean_rel_diff"] < 1e-7 and len(n["loss_rel_diff_by_step"].split()) == 8  # float32 reference vs float64 log
    assert saves_seen == [[], []]  # each run's checkpoint went once it ended: one on disk at a time
    assert n["wall_cases_s"] >= 0 and n["wall_reference_s"] >= 0 and n["gate_budget_s"] == g.options.timeout_s


def test_a_line_backlog_released_at_once_gains_nothing(monkeypatch):
    """10 timed steps (lines 5..15), the lines of steps 12-15 held back and released together: the window is
    never shorter than 10 x the median gap, the steady pace of the other lines."""
    fake_speed_runs(monkeypatch, {"warm": 50.0, "timed": 20.0},
                    arrivals=lambda steps: {t: 100.0 + 0.5 * min(t, 11) + 1e-3 * max(0, t - 11) for t in range(1, steps + 1)})
    part, _ = speed(speed_steps=10)
    assert part.verdict == "passed", part.message
    assert part.numbers["lines_span_s"] == pytest.approx(3.004) and part.numbers["timed_window_s"] == pytest.approx(5.0)


@pytest.mark.parametrize("arrivals, scale, why", [
    (lambda steps: {t: 100.0 for t in range(1, steps + 1)}, 1.0, "all appeared at once"),
    (lambda steps: {t: 100.0 + t for t in range(1, steps)}, 1.0, "never saw some of the timed steps' log lines"),
    (None, 1.05, "not the training the reference does"),
])
def test_speed_fails_untimeable_or_skipped_work(monkeypatch, arrivals, scale, why):
    fake_speed_runs(monkeypatch, {"warm": 5.0, "timed": 9.0}, loss_scale=scale, arrivals=arrivals)
    part, _ = speed()
    assert part.verdict == "failed" and why in part.message
    assert len(part.numbers["loss_rel_diff_by_step"].split()) == 8


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


def test_m5_mfu_part_alone_never_passes(monkeypatch):
    """m5_parts=mfu (a GPU run split over machine calls): the loss part is not run (no "long" pretrain, which the
    fake would refuse) and reads `unsupported`, so the gate's verdict is unsupported even with the MFU part passed."""
    fake_speed_runs(monkeypatch, {"warm": 50.0, "timed": 20.0})
    g = gate_run(case="tiny", **FIXED_N, m5_parts="mfu")
    try:
        report = m5_long_train.run(g)
    finally:
        g.cleanup()
    parts = {p.name: p for p in report.parts}
    assert parts["mfu"].verdict == "passed" and parts["loss"].verdict == "unsupported"
    assert "not run" in parts["loss"].message and report.verdict == "unsupported"
    assert not any("long" in c.role for c in report.commands)
    with pytest.raises(ValueError):
        GateOptions(m5_parts="speed")


@pytest.mark.parametrize("stop", [GateStop("error", "reference probe steps ran past the gate budget of 1s", "timeout"),
                                  GateTimeout("reference probe steps ran past the gate budget of 1s")],
                         ids=["stop", "timeout"])
def test_speed_keeps_the_clock_when_the_reference_check_stops(monkeypatch, stop):
    """A reference that runs out of the gate's budget (GateTimeout is what a timed-out command raises): the part
    is `error`, never passed, and the report still holds the clock's numbers (what a GPU call paid for)."""
    fake_speed_runs(monkeypatch, {"warm": 50.0, "timed": 20.0})

    def out_of_time(self, probe, case, **kw):
        time.sleep(0.05)
        raise stop

    monkeypatch.setattr(GateRun, "reference_probe", out_of_time)
    part, _ = speed()
    assert part.verdict == "error" and "not checked" in part.message and "gate budget" in part.message
    assert part.numbers["tokens_per_s"] == pytest.approx(3 * 4 * 32 / 1.5) and part.numbers["wall_timed_s"] == 20.0
    assert part.numbers["wall_reference_s"] >= 0.05  # the phase that ran out, so the next run knows what to grow


def test_speed_sizes_its_window_from_the_warm_run_and_times_it_on_its_own_clock(monkeypatch):
    """The warm run logs 0.25 s a step: N = 3 is raised to 20 so the window should last 5 s; the figure still
    comes from the lines' arrivals (0.4 s apart), and the reference checks the sized case's 25 steps."""
    fake_speed_runs(monkeypatch, {"warm": 50.0, "timed": 20.0}, gap=0.4)
    part, g = speed(speed_target_timed_s=5.0, speed_min_timed_s=4.0, case="tiny")
    assert part.verdict == "passed", part.message
    steps = [int(c.argv[c.argv.index("--num-steps") + 1]) for c in g.report.commands]
    assert steps == [3, 25] and part.numbers["timed_steps"] == 20
    assert len({c.cwd for c in g.report.commands}) == 1  # one box: init/ written once, the sized batches anew
    assert part.numbers["timed_window_s"] == pytest.approx(8.0)
    assert part.numbers["tokens_per_s"] == pytest.approx(20 * 4 * 32 / 8.0)


def test_speed_window_too_short_to_time_is_an_error_with_its_numbers(monkeypatch):
    fake_speed_runs(monkeypatch, {"warm": 50.0, "timed": 20.0})
    part, _ = speed(speed_min_timed_s=12.0)
    assert part.verdict == "error" and "too short" not in part.message and "shorter than 12s" in part.message
    assert part.numbers["tokens_per_s"] == pytest.approx(3 * 4 * 32 / 1.5)


@pytest.mark.parametrize("times, n, target, cap, want", [
    ([30.0, 2.0, 0.2, 0.2, 0.25], 10, 20.0, 200, 100),   # compile and capture skipped; median 0.2 s
    ([30.0, 2.0, 1.6, 1.6, 1.7], 10, 20.0, 200, 13),
    ([30.0, 2.0, 0.001, 0.001, 0.001], 10, 20.0, 200, 200),  # capped
    ([30.0, 2.0, 5.0, 5.0], 10, 20.0, 200, 10),           # never fewer than asked
    ([], 10, 20.0, 200, 10),                                # nothing logged: as asked
    ([30.0, 2.0, 0.0, 0.0], 10, 20.0, 200, 200),          # zero-cost claims: the cap
])
def test_sized_steps(times, n, target, cap, want):
    assert m5_long_train.sized_steps(times, n, target, cap) == want


def test_speed_window_defaults_by_device():
    assert GateOptions(device="cuda").speed_window_s() == (20.0, 5.0)
    assert GateOptions(device="cpu").speed_window_s() == (0.0, 0.0)
    assert GateOptions(device="cuda", speed_min_timed_s=3.0).speed_window_s() == (20.0, 3.0)
