"""How the loop runs a gate: the workspace's own gate runner (gates/runner.py), never the worktree's.

`GateFn` is the one seam: the loop calls `gate_fn(gate, engine_dir, spec, out_dir)` and gets a
`GateOutcome`. `run_real_gate` adapts gates.runner.run_gate; tests inject a small function instead.
"""

from __future__ import annotations

import json
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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

    def accepted(self, gate: GateCheck) -> bool:
        return self.verdict == "passed" or (self.verdict == "unsupported" and gate.allow_unsupported)

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


def localization_text(loc: Any) -> str | None:
    if loc in (None, "", {}, []):
        return None
    if isinstance(loc, str):
        return loc
    if isinstance(loc, dict):
        return "\n".join(f"{k}: {json.dumps(v, default=str) if not isinstance(v, str) else v}" for k, v in loc.items())
    return json.dumps(loc, indent=2, default=str)


def _options(gate: GateCheck, spec: ForgeSpec, out_dir: Path) -> dict[str, Any]:
    return {"reference": spec.reference, "case": gate.case, "world_size": gate.world_size,
            "device": gate.device or spec.hardware.device, "dtype": gate.dtype, "policy": gate.policy,
            "bounds": gate.bounds or None, "seed": gate.seed, "long_train_steps": gate.long_train_steps,
            "loss_rel_tol": gate.loss_rel_tol, "mfu_threshold": gate.mfu_threshold, "timeout_s": gate.timeout_s,
            "out_dir": out_dir}


def _accepted_fields(cls: Any) -> set[str] | None:
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__dataclass_fields__", None)
    return set(fields) if fields else None


def run_real_gate(gate: GateCheck, engine_dir: Path, spec: ForgeSpec, out_dir: Path) -> GateOutcome:
    """One gate through gates.runner.run_gate; a crash of the runner is an `error` verdict, not an exception."""
    from gates.runner import GateOptions, run_gate  # type: ignore[import-not-found]

    out_dir.mkdir(parents=True, exist_ok=True)
    opts = {k: v for k, v in _options(gate, spec, out_dir).items() if v is not None}
    allowed = _accepted_fields(GateOptions)
    if allowed is not None:
        opts = {k: v for k, v in opts.items() if k in allowed}
    try:
        report = run_gate(gate.name, engine_dir, GateOptions(**opts))
    except Exception as e:  # noqa: BLE001 - the round reports it
        return GateOutcome(gate.name, "error", localization=f"gate runner raised {type(e).__name__}: {e}\n"
                           + "".join(traceback.format_exc().splitlines(True)[-6:]))
    data = report.model_dump(mode="json") if hasattr(report, "model_dump") else dict(report)
    path = out_dir / f"{gate.name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    verdict = str(data.get("verdict", "error"))
    return GateOutcome(gate.name, verdict if verdict in GATE_VERDICTS else "error", dict(data.get("metrics") or {}),
                       localization_text(data.get("localization")), data.get("time_s"), path)
