"""The stage-1 gate runner: `GATES` (cheapest first), `run_gate`, `run_all`.

    from gates.runner import GATES, GateOptions, run_gate, run_all
    report = run_gate("m1_forward", Path("exports/train_engine_0.5B"), GateOptions(case="tiny"))

`run_gate` never raises for anything an engine or a stack does: a timeout is verdict `error` with
`error_type="timeout"`, a crash is `error` (`engine_crash` / `reference_crash`), a bad engine layout is
`error` (`layout`), a bug in a gate is `error` (`internal`, traceback in the artifacts).

`run_all` runs GATES in order with one seed (drawn once when `options.seed` is None) and stops at the
first `failed` or `error`; an `unsupported` gate (the hardware or a stack cannot do it) does not stop
the stage but keeps it from counting as passed (`stage_verdict`).
"""

from __future__ import annotations

import secrets
import traceback
from collections.abc import Callable
from pathlib import Path

from gates import (m1_forward, m2_backward, m3_optimizer, m4_data_parallel, m5_long_train, m6_checkpoint,
                   m7_pretrain, m8_resume)
from gates.context import GateRun, GateStop
from gates.launch import EngineLayoutError, GateTimeout, discover_engine
from gates.options import GateOptions
from gates.report import GateReport, environment, now_iso, worst

__all__ = ["GATES", "ALIASES", "GateOptions", "run_gate", "run_all", "stage_verdict", "resolve_name"]

GATES: dict[str, Callable[[GateRun], GateReport]] = {
    "m1_forward": m1_forward.run,
    "m2_backward": m2_backward.run,
    "m3_optimizer": m3_optimizer.run,
    "m4_data_parallel": m4_data_parallel.run,
    "m5_long_train": m5_long_train.run,
    "m6_checkpoint": m6_checkpoint.run,
    "m7_pretrain": m7_pretrain.run,
    "m8_resume": m8_resume.run,
}
ALIASES = {name.split("_", 1)[0]: name for name in GATES}  # m1 -> m1_forward, ...


def resolve_name(name: str) -> str:
    """A gate's full name from itself or its short alias (`m1`)."""
    full = ALIASES.get(name, name)
    if full not in GATES:
        raise KeyError(f"unknown gate {name!r}; one of {', '.join(GATES)} (or {', '.join(ALIASES)})")
    return full


def _with_seed(options: GateOptions) -> GateOptions:
    return options if options.seed is not None else options.model_copy(update={"seed": secrets.randbelow(2**31)})


def run_gate(name: str, engine: Path, options: GateOptions) -> GateReport:
    """Run one gate on the engine at `engine`; always returns a report (saved under options.out_dir)."""
    name = resolve_name(name)
    options = _with_seed(options)
    hardware, versions = environment(options.device)
    try:
        eng = discover_engine(engine)
    except EngineLayoutError as e:
        report = GateReport(gate=name, verdict="error", error_type="layout", message=str(e), engine=str(engine),
                            reference=options.reference, started_at=now_iso(), hardware=hardware, versions=versions)
        return _save(report, options)
    g = GateRun(name, eng, options)
    g.report.hardware, g.report.versions = hardware, versions
    try:
        report = GATES[name](g)
    except GateStop as stop:
        report = g.finish(stop.verdict, stop.message, stop.localization, stop.error_type)
    except GateTimeout as e:
        report = g.finish("error", str(e), error_type="timeout")
    except Exception as e:  # noqa: BLE001 - a gate bug is a verdict too, with its traceback
        g.report.artifacts["traceback"] = traceback.format_exc()[-4000:]
        report = g.finish("error", f"gate crashed: {type(e).__name__}: {e}", error_type="internal")
    finally:
        g.cleanup()
    return _save(report, options)


def _save(report: GateReport, options: GateOptions) -> GateReport:
    if options.out_dir is not None:
        report.save(options.out_dir)
    return report


def run_all(engine: Path, options: GateOptions) -> list[GateReport]:
    """Every gate in order (one seed for all), stopping at the first `failed` or `error`."""
    options = _with_seed(options)
    reports: list[GateReport] = []
    for name in GATES:
        report = run_gate(name, engine, options)
        reports.append(report)
        if report.verdict in ("failed", "error"):
            break
    return reports


def stage_verdict(reports: list[GateReport]) -> str:
    """`passed` only if every gate of the stage ran and passed; else the worst verdict (an early stop
    leaves gates unrun, which is never a pass)."""
    v = worst([r.verdict for r in reports])
    if v == "passed" and len(reports) < len(GATES):
        return "error"
    return v
