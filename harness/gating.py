"""How the loop runs a gate: the workspace's own gate runner (gates/runner.py), never the worktree's.

`GateFn` is the one seam: the loop calls `gate_fn(gate, engine_dir, spec, out_dir)` and gets a
`GateOutcome`. `run_real_gate` adapts gates.runner.run_gate; tests inject a small function instead.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gates.report import GateReport
from harness.spec import ForgeSpec, GateCheck

GATE_VERDICTS = ("passed", "failed", "unsupported", "error")


@dataclass
class GateOutcome:
    name: str
    verdict: str                        # passed | failed | unsupported | error
    metrics: dict[str, Any] = field(default_factory=dict)
    localization: str | None = None     # where engine and reference first diverge, as text
    time_s: float | None = None
    report: Path | None = None          # the full JSON report
    parts: dict[str, str] = field(default_factory=dict)  # part name -> verdict (M4, M5, M6 have parts)

    def accepted(self, gate: GateCheck) -> bool:
        """`passed`; or `unsupported` where the spec allows exactly the unsupported parts (and the rest passed)."""
        if self.verdict == "passed":
            return True
        if self.verdict != "unsupported" or not gate.allow_unsupported:
            return False
        if "*" in gate.allow_unsupported:
            return True
        unsupported = {p for p, v in self.parts.items() if v == "unsupported"}
        others = {v for p, v in self.parts.items() if v != "unsupported"}
        return bool(unsupported) and unsupported <= set(gate.allow_unsupported) and others <= {"passed"} and bool(others)

    def key_numbers(self, limit: int = 12) -> dict[str, Any]:
        """The scalar metrics (for the ledger line and the commit message)."""
        out = {}
        for k, v in self.metrics.items():
            if isinstance(v, bool) or isinstance(v, (int, float)) and math.isfinite(v):
                out[k] = round(v, 8) if isinstance(v, float) else v
            elif isinstance(v, str) and len(v) <= 40:
                out[k] = v
            if len(out) >= limit:
                break
        return out


GateFn = Callable[[GateCheck, Path, ForgeSpec, Path], GateOutcome]


def runner_available() -> bool:
    try:
        import gates.runner  # noqa: F401  # type: ignore[import-not-found]
    except ImportError:
        return False
    return True


def runner_options(gate: GateCheck, spec: ForgeSpec, out_dir: Path) -> dict[str, Any]:
    """GateOptions for one gate of `spec`: the spec's reference, device and tensor-parallel degree (every engine
    command's data-parallel rank is hardware.tp processes), then the gate's own fields."""
    return {"reference": spec.reference, "device": gate.device or spec.hardware.device, "tp": spec.hardware.tp,
            **gate.runner_options(), "out_dir": out_dir}


def load_report(path: str | Path | None) -> GateReport | None:
    """A gate's JSON report as the typed GateReport it was written from; None when missing or not a report."""
    try:
        return GateReport.model_validate_json(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def report_numbers(report: GateReport) -> dict[str, Any]:
    """The key numbers of a gate report: worst tensor, parts' numbers, seed."""
    out: dict[str, Any] = {}
    if report.tensors:
        worst = max(report.tensors, key=lambda t: (not t.ok, _num(t.rel)))
        out |= {"tensors": len(report.tensors), "worst_tensor": worst.name, "worst_rel": worst.rel,
                "worst_max_rel": worst.max_rel}
    for part in report.parts:
        for k, v in part.numbers.items():
            out[f"{part.name}.{k}"] = v
    if report.case.get("seed") is not None:
        out["seed"] = report.case["seed"]
    if report.error_type:
        out["error_type"] = report.error_type
    return out


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("inf")
    return f if f == f else float("inf")


def report_localization(report: GateReport) -> str | None:
    """Where it diverged first, else the message, else the failing parts' messages."""
    lines = []
    if report.localization is not None:
        loc = report.localization.model_dump(exclude_none=True)
        lines.append(str(loc.pop("what", "")))
        lines += [f"{k}: {v}" for k, v in loc.items()]
    if report.message:
        lines.append(report.message)
    lines += [f"part {p.name}: {p.verdict} {p.message}".rstrip() for p in report.parts if p.verdict != "passed"]
    tail = report.artifacts.get("stderr_tail") or report.artifacts.get("traceback")
    if tail and report.verdict == "error":
        lines.append("--- tail\n" + tail[-1500:])
    return "\n".join(x for x in lines if x) or None


def run_real_gate(gate: GateCheck, engine_dir: Path, spec: ForgeSpec, out_dir: Path) -> GateOutcome:
    """One gate through gates.runner.run_gate (the workspace's copy); a crash is an `error` verdict."""
    from gates.runner import GateOptions, run_gate

    out_dir.mkdir(parents=True, exist_ok=True)
    opts = runner_options(gate, spec, out_dir)
    known = set(GateOptions.model_fields)
    try:
        report = run_gate(gate.name, engine_dir, GateOptions(**{k: v for k, v in opts.items() if k in known}))
    except Exception as e:  # noqa: BLE001 - the round reports it
        return GateOutcome(gate.name, "error", localization=f"gate runner raised {type(e).__name__}: {e}\n"
                           + "".join(traceback.format_exc().splitlines(True)[-6:]))
    path = out_dir / f"{gate.name}.json"
    if not path.is_file():
        path.write_text(report.model_dump_json(indent=2) + "\n")
    return GateOutcome(gate.name, report.verdict, report_numbers(report), report_localization(report), report.time_s,
                       path, {p.name: p.verdict for p in report.parts})


# -- how verdicts read to a user (display only) ------------------------------------------------------------------

def unsupported_parts(report: str | Path | None) -> dict[str, str]:
    """The `unsupported` parts of a gate report (part name -> the gate's reason), read from its JSON file."""
    typed = load_report(report)
    return {p.name: p.message for p in typed.parts if p.verdict == "unsupported"} if typed else {}


def gate_line(gate: GateCheck, out: GateOutcome) -> str:
    """One gate's outcome as the console prints it (rich markup): an accepted `unsupported` says it was accepted."""
    style = "red" if not out.accepted(gate) else "yellow" if out.verdict == "unsupported" else "green"
    label = "unsupported (accepted by the spec)" if out.verdict == "unsupported" and out.accepted(gate) else out.verdict
    return f"gate {gate.name}: [{style}]{label}[/] {out.key_numbers(4)}"


def accepted_label(verdict: str, unsupported: dict[str, str]) -> str:
    """An accepted gate or stage as it must read: `passed`, or `passed (mfu unsupported)` when the spec accepted
    unsupported parts (part -> the gate's reason, said beside the table) — never a bare `passed` over them."""
    if not unsupported:
        return verdict
    return f"passed ({', '.join(unsupported)} unsupported)" if verdict in ("passed", "unsupported") else verdict


def round_label(verdict: str, gates: list[Any]) -> str:
    """A round's verdict from its ledger line (`gates`: GateLine-like, `.name`, `.verdict`, `.report`, or dicts)."""
    if verdict != "passed":
        return verdict
    unsupported: dict[str, str] = {}
    for g in gates:
        get = g.get if isinstance(g, dict) else lambda k, g=g: getattr(g, k, None)
        if get("verdict") == "unsupported":
            found = unsupported_parts(get("report")) or {str(get("name")): ""}
            unsupported |= {f"{get('name')} {p}" if p != get("name") else p: m for p, m in found.items()}
    return accepted_label(verdict, unsupported)


def stage_labels(stages: dict[str, str], ledger: Path) -> dict[str, str]:
    """A run's stage statuses as they must read: a passed stage whose passing round accepted unsupported parts
    says so (`passed (m5_long_train mfu unsupported)`)."""
    from harness.ledger import Ledger

    rounds = Ledger(ledger).rounds() if ledger.is_file() else []
    out = {}
    for name, status in stages.items():
        passing = [r for r in rounds if r.key == name and r.verdict == "passed"]
        out[name] = round_label(status, passing[-1].gates) if status == "passed" and passing else status
    return out
