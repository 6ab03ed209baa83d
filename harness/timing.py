"""The election's clock for ops stages: the gates' own, M5's speed part (the engine's `pretrain` at its defaults,
timed from outside by the arrivals of its log lines on the gate's clock, its timed steps' losses checked against
the reference).
The engine's own figures (`bench`, `step_time_s` in its log) are never read. A timing that fails, times out, lacks
the metric, or whose losses differ from the reference's yields None: a candidate without a time is never elected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gates.launch import Engine
    from gates.options import GateOptions
    from gates.report import Part
    from harness.spec import ForgeSpec, TimingSpec

# (engine dir, the stage's [stages.timing], the spec) -> (figure or None, a one-line note); tests pass fakes
StepClock = Callable[[Path, "TimingSpec", "ForgeSpec"], tuple[float | None, str]]


def gate_step_clock(engine_dir: Path, timing: "TimingSpec", spec: "ForgeSpec") -> tuple[float | None, str]:
    """The whole step on the gates' clock: M5's speed part on the spec's model and device."""
    return run_gate_timing(engine_dir, case=spec.model.preset, device=spec.hardware.device, metric=timing.metric,
                           timeout_s=timing.timeout_s, options={"tp": spec.hardware.tp} | timing.options)


def speed_part_on(engine: "Engine", options: "GateOptions") -> "Part":
    """M5's speed part on `engine` with `options`: the verdict, message and numbers of the gate's own clock."""
    from gates.context import GateRun
    from gates.m5_long_train import speed_part
    from gates.model_config import preset

    g = GateRun("m5_long_train", engine, options)
    try:
        return speed_part(g, preset(options.case))
    finally:
        g.cleanup()


def run_gate_timing(engine_dir: Path, *, case: str, device: str, metric: str, timeout_s: float,
                    options: dict) -> tuple[float | None, str]:
    """(metric or None, note) from M5's speed part on `engine_dir`: the gate's own clock, never the engine's."""
    from gates.launch import EngineLayoutError, discover_engine
    from gates.runner import GateOptions

    try:
        engine = discover_engine(engine_dir)
    except EngineLayoutError as e:
        return None, f"gate timing: {e}"
    gate_options = GateOptions(case=case, device=device, timeout_s=timeout_s, **({"mfu_threshold": 0.0} | options))
    try:
        part = speed_part_on(engine, gate_options)
    except Exception as e:  # noqa: BLE001 - a timing that breaks is a candidate without a time
        return None, f"gate timing crashed: {type(e).__name__}: {e}"
    value = part.numbers.get(metric)
    if part.verdict != "passed" or not isinstance(value, (int, float)):
        return None, f"gate timing {part.verdict}: {part.message[:300]}"
    return float(value), f"{metric}={value:.6g} on the gates' clock"
