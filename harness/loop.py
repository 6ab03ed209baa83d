"""The forge loop (DESIGN.md, "The harness loop").

For each stage of the spec: render the stage prompt with the last gate report, run the agent in a fresh
worktree, reject the round if it touched what it may not, run the stage's gates from the workspace's
own gate code, then commit (pass) or feed the report back (fail), within budgets. Every round is a
ledger line; the ledger and the state dir are all a killed run needs to resume (see harness/ledger.py).

Ops stages run per-op rounds: a candidate must pass the stage's gates (M5's loss part among them in the shipped
specs) and make the whole step faster on the gates' clock (harness/timing.py: M5's speed part, never the engine's
own figures) by more than ELECTION_MARGIN to be elected and committed; an op ends when its rounds are spent.

Under real agents: every process of a round runs in the round sandbox (harness/isolation.py); the keys stay
in harness.secrets.VAULT for the whole run (no child inherits one) and everything stored is redacted; each
process group is recorded in inflight.json with its identity and ended with the round, on SIGINT / SIGTERM /
SIGHUP (the round is recorded `interrupted`, forge exits 128 + the signal) and, after a kill -9, on resume
(harness/procs.py); usage is counted reply by reply on the round's meter, which also carries the budget
left, checked before every call. A round whose agent failed is `error`, whatever the gates say.

The loop is one class in four parts: this module (the run: start, resume, budgets, stages), harness/rounds.py (one
round), harness/election.py (ops stages' election), harness/commit.py (a passing round's commits); what they share is
declared in harness/loop_state.py.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from harness.agents import AgentBackend, get_backend
from harness.agents.base import Meter
from harness.agents.shell import shell_usage_after_kill
from harness.commit import Commit
from harness.election import ELECTION_MARGIN, Election
from harness.gating import GateFn, round_label, run_real_gate
from harness.isolation import SandboxUnavailable, round_isolation
from harness.ledger import Inflight, Ledger, RoundRecord, RunLock, RunState, write_json_atomic
from harness.loop_state import ForgeError
from harness.procs import Interrupted, Tracker, end_group, stop_signals
from harness.prompts import PROMPTS_DIR, WORKSPACE_ROOT
from harness.rounds import Rounds, fingerprint
from harness.secrets import RedactedStream, redact_tree, withheld
from harness.spec import ForgeSpec, StageSpec, spec_sha256
from harness.timing import StepClock, gate_step_clock
from harness.workspace import Workspace

__all__ = ["ELECTION_MARGIN", "ForgeError", "ForgeLoop", "RunOutcome", "fingerprint"]

GUARDED = ("harness", "gates", "prompts")   # the workspace's own code: must not change during a round
STOPPING = ("agent_unavailable", "agent_failed", "tampered")  # round verdicts that stop the run


@dataclass
class RunOutcome:
    status: str                      # passed | budget | agent_unavailable | agent_failed | tampered | interrupted
    message: str
    stages: dict[str, str] = field(default_factory=dict)
    branch: str | None = None
    tip: str | None = None
    state_dir: Path | None = None
    signum: int | None = None        # interrupted: the signal

    @property
    def ok(self) -> bool:
        return self.status == "passed"


class ForgeLoop(Rounds, Election, Commit):
    def __init__(self, spec: ForgeSpec, spec_path: Path, *, engine: Path, state_dir: Path,
                 gate_fn: GateFn | None = None, backend: AgentBackend | None = None, console: Console | None = None,
                 land: bool | None = None, prompts_dir: Path = PROMPTS_DIR, guard: list[Path] | None = None,
                 step_clock: StepClock | None = None) -> None:
        self.spec, self.spec_path = spec, Path(spec_path)
        self.engine = Path(engine).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.gate_fn: GateFn = gate_fn or run_real_gate
        self.step_clock: StepClock = step_clock or gate_step_clock
        self.backend_override = backend
        self.console = console or Console(file=RedactedStream())
        self.land = spec.loop.land if land is None else land
        self.prompts_dir = prompts_dir
        self.guard = guard if guard is not None else [WORKSPACE_ROOT / d for d in GUARDED] + [self.spec_path]
        self.ledger = Ledger(self.state_dir / "ledger.jsonl")
        self.state: RunState | None = None
        self.ws: Workspace | None = None
        self._inflight: Inflight | None = None
        self._inflight_lock = threading.Lock()  # the watcher thread writes it too
        self._meter: Meter | None = None
        self.procs = Tracker(on_change=lambda recs: self._save_inflight())
        self._hardware: dict | None = None

    # -- entry ---------------------------------------------------------------------------------------
    def run(self, resume: bool = False, only: list[str] | None = None) -> RunOutcome:
        for st in self.spec.stages:  # bad backend options and a missing sandbox fail here, before any state is written
            a = self.spec.agent_for(st)
            if self.backend_override is None:
                get_backend(a.backend, a.options, a.model)
            try:
                round_isolation(a.sandbox)
            except SandboxUnavailable as e:
                raise ForgeError(str(e)) from None
            if st.kind == "ops":
                self._check_ops_stage(st)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        statuses: dict[str, str] = {}
        with RunLock(self.state_dir), withheld(), stop_signals():
            try:
                return self._run(resume, only, statuses)
            except Interrupted as e:
                if self.state is not None:
                    self.ledger.event(self.state.run_id, "run_interrupted", signal=signal.Signals(e.signum).name)
                self.console.print(f"[red]{e}[/]: the round's processes were ended; continue with --resume")
                return self._outcome("interrupted", f"{e}; continue with --resume", statuses, e.signum)

    def _run(self, resume: bool, only: list[str] | None, statuses: dict[str, str]) -> RunOutcome:
        self._start(resume)
        assert self.state is not None and self.ws is not None
        statuses.update({s.name: ("passed" if self._stage_passed(s) else "pending") for s in self.spec.stages})
        for stage in self.spec.stages:
            if only and stage.name not in only:
                continue
            if statuses[stage.name] == "passed":
                self.console.print(f"[dim]stage {stage.name}: passed earlier, skipped[/]")
                continue
            status, message = self._ops_stage(stage) if stage.kind == "ops" else self._gates_stage(stage)
            statuses[stage.name] = status
            if status != "passed":
                self.ledger.event(self.state.run_id, "run_stopped", stage=stage.name, status=status, message=message)
                return self._outcome(status, message, statuses)
        pending = [k for k, v in statuses.items() if v != "passed"]
        self.ledger.event(self.state.run_id, "run_passed", tip=self.ws.branch_tip(), not_run=pending)
        message = "every stage passed" if not pending else (
            f"the stages run passed; not run: {', '.join(pending)}")
        return self._outcome("passed", message, statuses)

    def _outcome(self, status: str, message: str, stages: dict[str, str], signum: int | None = None) -> RunOutcome:
        ws = self.ws
        return RunOutcome(status, message, stages, ws.branch if ws else None, ws.branch_tip() if ws else None,
                          self.state_dir, signum)

    def _start(self, resume: bool) -> None:
        run_file = self.state_dir / "run.json"
        sha = spec_sha256(self.spec_path)
        if resume:
            if not run_file.is_file():
                raise ForgeError(f"nothing to resume: {run_file} does not exist")
            self.state = RunState.model_validate_json(run_file.read_text())
            if self.state.spec_name != self.spec.name:
                raise ForgeError(f"{self.state_dir} holds a run of spec {self.state.spec_name!r}, not {self.spec.name!r}")
            if Path(self.state.engine).resolve() != self.engine:
                raise ForgeError(f"{self.state_dir} forges {self.state.engine}, not {self.engine}")
            self.ws = Workspace(self.engine, self.state.branch, self.state_dir / "worktrees")
            self._recover(sha)
            return
        if run_file.is_file():
            raise ForgeError(f"{self.state_dir} already holds a run: continue it with --resume, "
                             "or choose another --state-dir")
        run_id = time.strftime("%Y%m%d-%H%M%S")
        self.state = RunState(run_id=run_id, spec_name=self.spec.name, spec_path=str(self.spec_path),
                              spec_sha256=sha, branch=f"forge/{self.spec.name}-{run_id}", engine=str(self.engine))
        self.ws = Workspace(self.engine, self.state.branch, self.state_dir / "worktrees")
        base = self.ws.ensure_branch()
        write_json_atomic(run_file, self.state)
        self.ledger.event(run_id, "run_started", spec=self.spec.name, spec_sha256=sha, branch=self.state.branch,
                          base=base, engine=str(self.engine))
        self.console.print(f"forge run {run_id}: branch {self.state.branch} from {base[:10]}")

    def _recover(self, sha: str) -> None:
        """Make the state consistent after a kill: end the interrupted round, drop stray worktrees,
        and point the branch at the last commit the ledger says passed."""
        assert self.state is not None and self.ws is not None
        run_id = self.state.run_id
        self.ledger.event(run_id, "run_resumed", spec_sha256=sha, spec_changed=sha != self.state.spec_sha256)
        if sha != self.state.spec_sha256:
            self.console.print("[yellow]resume: the spec file changed since the run started (recorded in the ledger); "
                               "budgets and gates are read from the new one[/]")
        inflight_file = self.state_dir / "inflight.json"
        if inflight_file.is_file():
            try:
                inf = Inflight.model_validate_json(inflight_file.read_text())
            except ValueError:
                inf = None
            if inf is not None:
                notes = [end_group(p) for p in inf.procs]  # by group, after checking each is still ours
                self.ledger.event(run_id, "orphans_checked", key=inf.key, round=inf.round, procs=notes)
                for note in notes:
                    self.console.print(f"resume: {note}")
                done = any(r.round == inf.round for r in self.ledger.rounds(inf.key))
                if not done:
                    if inf.backend == "shell" and inf.outbox:  # its usage file was never read: the kill came first
                        inf = shell_usage_after_kill(inf, Path(inf.outbox))
                    self.ledger.append(RoundRecord(run_id=run_id, stage=inf.stage, op=inf.op, round=inf.round,
                                                   backend=inf.backend, model=inf.model, prompt_sha256=inf.prompt_sha256,
                                                   tokens_in=inf.tokens_in, tokens_out=inf.tokens_out,
                                                   cost_usd=inf.cost_usd, wall_s=time.time() - inf.started,
                                                   verdict="interrupted", counted=False,
                                                   note="the forge run was killed during this round"))
                self.console.print(f"[yellow]resume: round {inf.round} of {inf.key} was interrupted; it is redone[/]")
                redact_tree(self.state_dir / "rounds" / f"{inf.key}-r{inf.round:02d}")  # a kill -9 skipped its scrub
            inflight_file.unlink()
        stale = self.ws.cleanup_stale()
        if stale:
            self.console.print(f"resume: removed stale worktrees {', '.join(stale)}")
        tips = [r.tip for r in self.ledger.rounds() if r.tip]
        tip = self.ws.branch_tip()
        if tips and tip != tips[-1] and not (tip and self.ws.is_ancestor(tips[-1], tip)):
            self.ws.force_branch(tips[-1])  # killed between the ledger line and the ref update
            self.console.print(f"resume: branch {self.ws.branch} set to {tips[-1][:10]} (the ledger's last pass)")
        if tips and self.land:
            self.ws.land()

    # -- budgets -------------------------------------------------------------------------------------
    def _stage_passed(self, stage: StageSpec) -> bool:
        if stage.kind == "ops":
            return set(stage.ops) <= self.ledger.ops_done(stage.name)
        return any(r.verdict == "passed" for r in self._records(stage.name))

    def _rounds_spent(self, key: str, rounds_allowed: int) -> bool:
        return sum(1 for r in self._records(key) if r.counted) >= rounds_allowed

    def _run_budget_stop(self) -> str | None:
        """The run-wide budget that is spent, if any (wall time, tokens, cost; summed over resumes)."""
        b = self.spec.budgets
        t = self.ledger.totals()
        if b.wall_time_s is not None and t["wall_s"] >= b.wall_time_s:
            return f"wall-time budget spent ({t['wall_s']:.0f} s of {b.wall_time_s:.0f} s)"
        if b.tokens is not None and t["tokens_in"] + t["tokens_out"] >= b.tokens:
            return f"token budget spent ({t['tokens_in'] + t['tokens_out']:.0f} of {b.tokens})"
        if b.cost_usd is not None and t["cost_usd"] >= b.cost_usd:
            return f"cost budget spent (${t['cost_usd']:.2f} of ${b.cost_usd:.2f})"
        return None


    # -- stages --------------------------------------------------------------------------------------
    def _gates_stage(self, stage: StageSpec) -> tuple[str, str]:
        assert self.state is not None
        limit = self.spec.rounds_for(stage)
        while True:
            stop = self._run_budget_stop()
            if stop is None and self._rounds_spent(stage.name, limit):
                stop = f"stage {stage.name}: all {limit} rounds spent without a pass"
            if stop:
                self.console.print(f"[red]stage {stage.name} stopped: {stop}[/]")
                return "budget", stop
            rec = self._round(stage, op=None)
            if rec.verdict == "passed":
                label = round_label(rec.verdict, rec.gates)  # "passed (m5_long_train mfu unsupported)" where so
                self.console.print(f"[green]stage {stage.name} {label} in round {rec.round}[/] (commit {rec.commit[:10]})")
                return "passed", f"stage {stage.name} passed"
            if rec.verdict in STOPPING:
                return rec.verdict, rec.note or rec.verdict

    def _ops_stage(self, stage: StageSpec) -> tuple[str, str]:
        assert self.state is not None
        limit = self.spec.rounds_for(stage)
        for op in stage.ops:
            key = f"{stage.name}-{op}"
            if op in self.ledger.ops_done(stage.name):
                continue
            while not self._rounds_spent(key, limit):  # spent rounds end the op: its best stays elected
                stop = self._run_budget_stop()
                if stop:
                    self.console.print(f"[red]stage {stage.name} stopped: {stop}[/]")
                    return "budget", stop
                rec = self._round(stage, op=op)
                if rec.verdict in STOPPING:
                    return rec.verdict, rec.note or rec.verdict
            best = self._op_best(key)
            self.ledger.event(self.state.run_id, "op_done", stage=stage.name, op=op, best=best[0], best_round=best[1])
            self.console.print(f"op {op}: best {best[0]} (round {best[1]})")
        return "passed", f"stage {stage.name}: every op has had its rounds"
