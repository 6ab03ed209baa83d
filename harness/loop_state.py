"""What the forge loop's parts share: the run's objects (`LoopParts`, the attributes ForgeLoop sets in __init__,
declared once so each part reads typed) and the error a run that cannot go on raises. The parts are mixins of
ForgeLoop (harness/loop.py): rounds (harness/rounds.py), election (harness/election.py), commit
(harness/commit.py); each method keeps its name on ForgeLoop, so a test may wrap one there.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rich.console import Console

from harness.agents import AgentBackend
from harness.agents.base import Meter
from harness.gating import GateFn
from harness.ledger import Inflight, Ledger, RoundRecord, RunState
from harness.procs import Tracker
from harness.spec import ForgeSpec, GateCheck, StageSpec
from harness.timing import StepClock
from harness.workspace import Workspace


class ForgeError(RuntimeError):
    """A run that cannot start or continue (no state to resume, state of another spec, ...)."""


class LoopParts:
    """The state every part of the loop reads (set by ForgeLoop.__init__ and its run)."""

    spec: ForgeSpec
    spec_path: Path
    engine: Path
    state_dir: Path
    gate_fn: GateFn
    step_clock: StepClock
    backend_override: AgentBackend | None
    console: Console
    land: bool
    prompts_dir: Path
    guard: list[Path]
    ledger: Ledger
    state: RunState | None
    ws: Workspace | None
    procs: Tracker
    _inflight: Inflight | None
    _inflight_lock: threading.Lock
    _meter: Meter | None
    _hardware: dict | None

    def _records(self, key: str) -> list[RoundRecord]:
        """The rounds of one stage or `stage-op` key (ForgeLoop's budgets read them too)."""
        return self.ledger.rounds(key)

    def _remaining_wall(self) -> float:
        b = self.spec.budgets.wall_time_s
        return float("inf") if b is None else max(1.0, b - self.ledger.totals()["wall_s"])

    def _gates_for(self, stage: StageSpec) -> list[GateCheck]:
        """The stage's gates, after every earlier gate stage's under [loop] regression."""
        gates = list(stage.gates)
        if self.spec.loop.regression and stage.kind == "gates":
            earlier = [g for s in self.spec.stages[: self.spec.stages.index(stage)] if s.kind == "gates" for g in s.gates]
            gates = earlier + gates
        return gates
