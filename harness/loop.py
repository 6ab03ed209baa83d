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
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from harness import manifest as mf
from harness.agents import AgentBackend, AgentResult, AgentTask, AgentUnavailable, get_backend
from harness.agents._env import agent_env
from harness.agents.base import AgentFatal, BudgetSpent, Meter
from harness.agents.shell import shell_usage_after_kill
from harness.agents.tune import TRIALS, TuneError, TuneOptions, check_options, round_runner
from harness.gating import GateFn, GateOutcome, gate_line, report_localization, round_label, run_real_gate
from harness.isolation import RoundBox, SandboxUnavailable, round_isolation
from harness.ledger import GateLine, Inflight, Ledger, RoundRecord, RunLock, RunState, write_json_atomic
from harness.procs import TAG, Interrupted, Tracker, end_group, stop_signals
from gates.ops.harness import LEADERBOARDS, CandidateResult, HarnessOptions, OpSpecError, check_candidate, describe
from gates.ops.harness import leaderboard_path
from gates.ops.harness import record as record_op_result
from harness.prompts import PROMPTS_DIR, WORKSPACE_ROOT, Feedback, OpContext, op_material, render
from harness.secrets import RedactedStream, redact, redact_tree, withheld
from harness.spec import AgentSpec, ForgeSpec, GateCheck, StageSpec, spec_sha256
from harness.timing import StepClock, gate_step_clock
from harness.workspace import RoundTree, Snapshot, Workspace

GUARDED = ("harness", "gates", "prompts")   # the workspace's own code: must not change during a round
STOPPING = ("agent_unavailable", "agent_failed", "tampered")  # round verdicts that stop the run
ELECTION_MARGIN = 0.01  # a step time within 1 % of the best is noise, not an election


class ForgeError(RuntimeError):
    """A run that cannot start or continue (no state to resume, state of another spec, ...)."""


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


def fingerprint(paths: list[Path]) -> str:
    """sha256 over the guarded files (the harness, the gates, the prompts, the spec)."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                     and "__pycache__" not in p.parts and p.suffix != ".pyc")
        for p in files:
            h.update(str(p).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


class ForgeLoop:
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
    def _records(self, key: str) -> list[RoundRecord]:
        return self.ledger.rounds(key)

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

    def _remaining_wall(self) -> float:
        b = self.spec.budgets.wall_time_s
        return float("inf") if b is None else max(1.0, b - self.ledger.totals()["wall_s"])

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

    def _op_best(self, key: str) -> tuple[float | None, int | None]:
        elected = [r for r in self._records(key) if r.elected and r.timing is not None]
        if elected:
            return elected[-1].timing, elected[-1].round
        baseline = self.ledger.op_baseline(key)
        return (baseline.value, None) if baseline is not None else (None, None)

    # -- one round -----------------------------------------------------------------------------------
    def _feedback(self, key: str, base: str) -> tuple[Feedback | None, Path | None]:
        """The last judged round of `key` as feedback, and its patch when its edits carry over."""
        judged = [r for r in self._records(key) if r.verdict in ("failed", "rejected", "error")]
        if not judged:
            return None, None
        last = judged[-1]
        patch = self.state_dir / "rounds" / f"{key}-r{last.round:02d}" / "changes.patch"
        carry = (self.spec.loop.carry_failed_edits and last.verdict == "failed" and last.base == base
                 and last.note != "not faster" and patch.is_file() and patch.stat().st_size > 1)
        gates = [{"name": g.name, "verdict": g.verdict, "metrics": g.metrics, "report": g.report,
                  "localization": self._localization(g.report)} for g in last.gates]
        fb = Feedback(round=last.round, verdict=last.verdict, gates=gates, forbidden=last.forbidden,
                      agent_error=last.agent_error, carried=carry)
        return fb, patch if carry else None

    @staticmethod
    def _localization(report: str | None) -> str | None:
        if not report or not Path(report).is_file():
            return None
        try:
            data = json.loads(Path(report).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return report_localization(data)

    def _save_inflight(self) -> None:
        """inflight.json with the round's process groups and usage so far (the watcher thread calls it too)."""
        with self._inflight_lock:
            inf, meter = self._inflight, self._meter
            if inf is None:
                return
            inf.procs = list(self.procs.records)
            if meter is not None:
                inf.tokens_in, inf.tokens_out, inf.cost_usd = _usage(meter)
            write_json_atomic(self.state_dir / "inflight.json", inf)

    def _new_meter(self) -> Meter:
        """The round's meter, with what is left of the run's token and cost budgets."""
        b, t = self.spec.budgets, self.ledger.totals()
        return Meter(token_limit=None if b.tokens is None else max(0, b.tokens - int(t["tokens_in"] + t["tokens_out"])),
                     cost_limit=None if b.cost_usd is None else max(0.0, b.cost_usd - t["cost_usd"]),
                     on_change=lambda m: self._save_inflight())

    def _box(self, agent: AgentSpec, rt: RoundTree, round_dir: Path, prompt_file: Path) -> RoundBox:
        """The round's sandbox: the run's state and a scratch repository's checkout hidden."""
        assert self.ws is not None
        out = round_dir / "agent" / "out"
        out.mkdir(parents=True, exist_ok=True)
        hidden = [self.state_dir]
        if self.ws.root != WORKSPACE_ROOT and self.ws.root not in WORKSPACE_ROOT.parents:
            hidden.append(self.ws.root)
        shown = tuple(Path(p).expanduser() for p in agent.share) + (prompt_file,)
        return RoundBox(round_isolation(agent.sandbox), rt.path, self.ws.git_common, rt.git_admin, out,
                        tuple(hidden), shown)

    def _round(self, stage: StageSpec, op: str | None) -> RoundRecord:
        assert self.state is not None and self.ws is not None
        key = stage.name if op is None else f"{stage.name}-{op}"
        round_no = max((r.round for r in self._records(key)), default=0) + 1
        round_dir = self.state_dir / "rounds" / f"{key}-r{round_no:02d}"
        round_dir.mkdir(parents=True, exist_ok=True)
        agent_spec = self.spec.agent_for(stage)
        backend = self.backend_override or get_backend(agent_spec.backend, agent_spec.options, agent_spec.model)
        t_start = time.monotonic()
        rt = self.ws.create_round(round_dir.name)
        rec = RoundRecord(run_id=self.state.run_id, stage=stage.name, op=op, round=round_no, backend=backend.name,
                          model=agent_spec.model, base=rt.base, verdict="failed")
        self._meter = meter = self._new_meter()
        self.procs.tag = f"{self.state.run_id}/{round_dir.name}"
        with self._inflight_lock:
            self._inflight = Inflight(key=key, stage=stage.name, op=op, round=round_no, worktree=str(rt.path),
                                      backend=backend.name, model=agent_spec.model)
        self._save_inflight()  # before anything is spawned: a kill -9 from here on is reconciled on resume
        try:
            with self.procs.watching():
                return self._round_body(stage, op, key, rt, rec, meter, backend, agent_spec, round_dir, t_start)
        except Interrupted as e:
            self.procs.end_all()
            recorded = any(r.round == round_no for r in self.ledger.rounds(key))
            rec.tokens_in, rec.tokens_out, rec.cost_usd = _usage(meter)
            rec.verdict, rec.counted, rec.note = "interrupted", False, f"{e}: the round's processes were ended"
            self._finish(rec, rt, t_start, round_dir, appended=recorded)
            raise

    def _round_body(self, stage: StageSpec, op: str | None, key: str, rt: RoundTree, rec: RoundRecord, meter: Meter,
                    backend: AgentBackend, agent_spec: AgentSpec, round_dir: Path, t_start: float) -> RoundRecord:
        ws = self.ws
        assert ws is not None
        feedback, carry_patch = self._feedback(key, rt.base)
        if feedback is not None and carry_patch is not None and not ws.apply_patch(rt, carry_patch):
            feedback.carried = False
        prompt_file = round_dir / "prompt.md"
        box = self._box(agent_spec, rt, round_dir, prompt_file)
        rec.isolation = box.describe()
        op_ctx = self._op_context(stage, key, op, rt, box) if op else None
        prompt = render(self.spec, stage, prompts_dir=self.prompts_dir, round_no=rec.round,
                        max_rounds=self.spec.rounds_for(stage), engine_dir=rt.engine_dir, feedback=feedback, op=op_ctx)
        prompt_file.write_text(prompt)
        rec.prompt_sha256 = hashlib.sha256(prompt.encode()).hexdigest()
        with self._inflight_lock:
            assert self._inflight is not None
            self._inflight.prompt_sha256 = rec.prompt_sha256
            self._inflight.outbox = str(box.out_dir)
        self._save_inflight()
        self.console.print(f"[bold]{key} round {rec.round}[/] · {backend.name} · prompt {rec.prompt_sha256[:10]}"
                           + ("" if box.sandboxed else f" · [yellow]not sandboxed: {box.iso.reason}[/]"))
        task = AgentTask(stage=stage.name, round=rec.round, prompt=prompt, prompt_file=prompt_file, worktree=rt.path,
                         engine_dir=rt.engine_dir, op=op,
                         env=agent_env(agent_spec.env_allow, agent_spec.env) | {"FORGE_OUT_DIR": str(box.out_dir),
                                                                                 TAG: self.procs.tag},
                         log_dir=round_dir / "agent", box=box, meter=meter, on_spawn=self.procs.spawned,
                         timeout_s=min(agent_spec.timeout_s, self._remaining_wall()),
                         extra={"package": self.spec.engine.package, "preset": self.spec.model.preset,
                                "device": self.spec.hardware.device,
                                "timing": stage.timing.model_dump() if stage.timing else None})
        guard_before = fingerprint(self.guard)
        t_agent = time.monotonic()
        try:
            result = backend.run(task)
        except (AgentUnavailable, AgentFatal, BudgetSpent) as e:
            rec.tokens_in, rec.tokens_out, rec.cost_usd = _usage(meter)
            rec.agent_s = round(time.monotonic() - t_agent, 3)
            rec.note = redact(str(e))
            if isinstance(e, BudgetSpent):  # counted; the run's budget check stops the stage next
                rec.verdict, rec.agent_error = "error", rec.note
            else:
                rec.verdict, rec.counted = ("agent_unavailable" if isinstance(e, AgentUnavailable) else "agent_failed"), False
                self.console.print(f"[red]the agent cannot run: {rec.note}[/]")
            return self._finish(rec, rt, t_start, round_dir)
        except Exception as e:  # noqa: BLE001 - a crashing backend is a result of the round
            result = AgentResult(error=f"backend raised {type(e).__name__}: {e}")
        rec.agent_s = round(time.monotonic() - t_agent, 3)
        rec.tokens_in, rec.tokens_out, rec.cost_usd = _usage(meter)
        rec.agent_error = redact(result.error) if result.error else None
        write_json_atomic(round_dir / "agent" / "result.json",
                          {**result.__dict__, "tokens_in": rec.tokens_in, "tokens_out": rec.tokens_out,
                           "cost_usd": rec.cost_usd, "isolation": rec.isolation})
        if fingerprint(self.guard) != guard_before:
            rec.verdict = "tampered"
            rec.note = "the workspace's own harness/gates/prompts/spec changed during the round; the run stops"
            self.console.print(f"[red]{rec.note}[/]")
            return self._finish(rec, rt, t_start, round_dir)
        snap = ws.snapshot(rt)
        (round_dir / "changes.patch").write_text(ws.patch(rt, snap) if snap.changes else "")
        rec.diff, rec.changed = snap.stat(), snap.paths[:50]
        rec.forbidden = ws.forbidden(snap, self.spec.engine.allowed_paths)
        if rec.forbidden:
            rec.verdict = "rejected"
            self.console.print(f"[red]round rejected: changed {', '.join(rec.forbidden[:5])}[/]")
            return self._finish(rec, rt, t_start, round_dir)
        if op is not None:  # the per-op harness first: a wrong op never reaches the gates or the clock
            why = self._op_check(stage, op, rec, rt, box, round_dir)
            if why is not None:
                rec.verdict, rec.note = ("error" if rec.agent_error else "failed"), why
                self.console.print(f"  [red]per-op harness: {why}[/]")
                return self._finish(rec, rt, t_start, round_dir)
        results = self._run_gates(stage, rt, round_dir / "gates", rec)
        accepted = all(out.accepted(g) for g, out in results) and len(results) == len(self._gates_for(stage))
        if rec.agent_error:
            rec.verdict, rec.note = "error", _agent_failed_note(rec.agent_error, snap, accepted)
            return self._finish(rec, rt, t_start, round_dir)
        if accepted and op is not None:
            accepted = self._elect(stage, key, op, rt, rec, op_ctx, box)
        if not accepted:
            return self._finish(rec, rt, t_start, round_dir)
        rec.verdict = "passed"
        self._commit(stage, rec, rt, snap.tree, results, op, t_start)
        return self._finish(rec, rt, t_start, round_dir, appended=True)

    def _gates_for(self, stage: StageSpec) -> list[GateCheck]:
        gates = list(stage.gates)
        if self.spec.loop.regression and stage.kind == "gates":
            earlier = [g for s in self.spec.stages[: self.spec.stages.index(stage)] if s.kind == "gates" for g in s.gates]
            gates = earlier + gates
        return gates

    def _run_gates(self, stage: StageSpec, rt: RoundTree, out_dir: Path, rec: RoundRecord) -> list[tuple[GateCheck, GateOutcome]]:
        results = []
        t0 = time.monotonic()
        for i, gate in enumerate(self._gates_for(stage)):
            out = self.gate_fn(gate, rt.engine_dir, self.spec, out_dir / f"{i:02d}-{gate.name}")
            results.append((gate, out))
            rec.gates.append(GateLine(name=gate.name, verdict=out.verdict, metrics=out.key_numbers(), time_s=out.time_s,
                                      report=str(out.report) if out.report else None))
            self.console.print(f"  {gate_line(gate, out)}")
            if not out.accepted(gate):
                if out.localization:
                    self.console.print(f"    [dim]{out.localization.splitlines()[0][:160]}[/]")
                break
        rec.gate_s = round(time.monotonic() - t0, 3)
        return results

    def _check_ops_stage(self, stage: StageSpec) -> None:
        """Before any state: the election's clock is the gates' own, and every op is one the engine declares."""
        assert stage.timing is not None
        if stage.timing.command is not None:
            raise ForgeError(f"stage {stage.name}: [stages.timing].command is not read: elections run on the gates' "
                             "clock (M5's speed part); remove it (the tune backend's own figure is the per-op harness's)")
        try:
            table = describe(self.engine)
        except OpSpecError as e:
            raise ForgeError(f"stage {stage.name}: {e}") from None
        unknown = [op for op in stage.ops if op.partition(".")[0] not in table.table]
        if unknown:
            raise ForgeError(f"stage {stage.name}: unknown op(s) {', '.join(map(repr, unknown))}; the engine's ops: "
                             f"{', '.join(table.table)}")
        agent = self.spec.agent_for(stage)
        if agent.backend == "tune" and self.backend_override is None:  # its space: names the engine declares
            options = TuneOptions.model_validate(agent.options)
            for op in stage.ops:
                try:
                    check_options(options, table, op, self.spec.hardware.device)
                except (OpSpecError, TuneError) as e:
                    raise ForgeError(f"stage {stage.name} [stages.agent.options]: {e}") from None

    def _op_context(self, stage: StageSpec, key: str, op: str, rt: RoundTree, box: RoundBox) -> OpContext:
        timing = stage.timing
        assert timing is not None, f"ops stage {stage.name} needs [stages.timing]"
        best, best_round = self._op_best(key)
        if best is None and self.ledger.op_baseline(key) is None:
            best, note = self.step_clock(rt.engine_dir, timing, self.spec)
            assert self.state is not None
            self.ledger.event(self.state.run_id, "op_baseline", key=key, op=op, value=best, note=note)
            self.console.print(f"op {op}: baseline {note}")
        return OpContext(name=op, metric=timing.metric, minimize=timing.minimize, best=best, best_round=best_round,
                         **op_material(rt.engine_dir, op))

    def _harness_options(self, stage: StageSpec) -> HarnessOptions:
        """The stage's per-op harness options: tune's own when the stage runs it, else the spec's device and dtype."""
        options = self.spec.agent_for(stage).options.get("harness")
        if options is not None:
            return HarnessOptions.model_validate(options).model_copy(update={"device": self.spec.hardware.device})
        return HarnessOptions(device=self.spec.hardware.device, dtype=stage.gates[0].dtype or "float32")

    def _op_check(self, stage: StageSpec, op: str, rec: RoundRecord, rt: RoundTree, box: RoundBox,
                  round_dir: Path) -> str | None:
        """Puts the round's tune trials on the op's leaderboard, then checks the op as the candidate engine runs it
        by default (its implementation and tuned values) in the per-op harness, in the round's sandbox. Returns
        why it fails, or None."""
        board_root, source = self.state_dir, f"{rec.key} round {rec.round}"
        trials = round_dir / "agent" / TRIALS
        if rec.backend == "tune" and trials.is_file():
            data = json.loads(trials.read_text())
            for t in data["trials"]:
                record_op_result(board_root, CandidateResult.model_validate(t),
                                 options=HarnessOptions.model_validate(data["harness"]), source=f"{source} (tune)")
        options = self._harness_options(stage)
        runner = round_runner(agent_env(self.spec.agent.env_allow, self.spec.agent.env) | {TAG: self.procs.tag}, box,
                              self.procs.spawned)
        try:
            engine_ops = describe(rt.engine_dir, runner=runner)
        except OpSpecError as e:
            return str(e)
        candidate = engine_ops.default_candidate(op, options.device)
        if candidate is None:
            return None  # the reference (or a fusion) runs: nothing optimized to check against it
        try:
            result = check_candidate(rt.engine_dir, candidate, preset=self.spec.model.preset, options=options,
                                     engine_ops=engine_ops, runner=runner)
        except OpSpecError as e:
            return str(e)
        record_op_result(board_root, result, options=options, source=f"{source} (the round's default)")
        return None if result.verdict == "passed" else f"{candidate.op}={candidate.impl} {candidate.values}: {result.message}"

    def _tuned_but_idle(self, op: str, rec: RoundRecord, rt: RoundTree, box: RoundBox) -> str | None:
        """Why a tune round's implementation does not run in the step on this device (auto picks another), or None."""
        trials = self.state_dir / "rounds" / f"{rec.key}-r{rec.round:02d}" / "agent" / TRIALS
        if rec.backend != "tune" or not trials.is_file():
            return None
        impls = {t["impl"] for t in json.loads(trials.read_text())["trials"]}
        runner = round_runner(agent_env(self.spec.agent.env_allow, self.spec.agent.env) | {TAG: self.procs.tag}, box,
                              self.procs.spawned)
        device = self.spec.hardware.device
        runs = describe(rt.engine_dir, runner=runner).resolved.get(device, {}).get("names", {}).get(op)
        if runs in impls:
            return None
        return f"{op}={'/'.join(sorted(impls))} does not run in the step on {device} (auto runs {runs}): nothing to elect"

    def _elect(self, stage: StageSpec, key: str, op: str, rt: RoundTree, rec: RoundRecord, ctx: OpContext | None,
               box: RoundBox) -> bool:
        """Elected when the whole step, on the gates' clock, beats the op's best by more than ELECTION_MARGIN."""
        timing = stage.timing
        assert timing is not None and ctx is not None
        idle = self._tuned_but_idle(op, rec, rt, box)
        if idle is not None:  # the step cannot have changed: any difference on the clock would be noise
            rec.elected, rec.note = False, idle
            self.console.print(f"  not elected: {idle}")
            return False
        value, note = self.step_clock(rt.engine_dir, timing, self.spec)
        rec.timing = value
        gain = 1 + ELECTION_MARGIN
        better = value is not None and ctx.best is not None and (value * gain < ctx.best if timing.minimize
                                                                  else value > ctx.best * gain)
        rec.elected = better
        rec.note = None if better else (note if value is None else "not faster on the gates' clock" if ctx.best is
                                        not None else "the baseline has no time on the gates' clock: nothing to beat")
        self.console.print(f"  timing {note}; best so far {ctx.best}; {'elected' if better else 'not elected'}")
        return better

    def _commit(self, stage: StageSpec, rec: RoundRecord, rt: RoundTree, tree: str,
                results: list[tuple[GateCheck, GateOutcome]], op: str | None, t_start: float) -> None:
        """Code commit (when the round changed anything), then the manifest commit; ledger first, then the ref."""
        assert self.state is not None and self.ws is not None
        verdicts = ", ".join(f"{g.name} {o.verdict}" for g, o in results)
        numbers = "; ".join(f"{g.name}: " + ", ".join(f"{k}={v}" for k, v in o.key_numbers(6).items()) for g, o in results)
        what = f"{stage.name}" + (f" op {op}" if op else "")
        msg = (f"forge({what}): {verdicts} (round {rec.round}, {rec.backend})\n\n{numbers}\n"
               + (f"{op} {stage.timing.metric if stage.timing else ''}={rec.timing}\n" if op else "")
               + f"\nForge-Run: {self.state.run_id}\nForge-Stage: {stage.name}\nForge-Round: {rec.round}\n")
        commit = rt.base if tree == self.ws.tree_of(rt.base) else self.ws.commit_tree(tree, rt.base, msg)
        rec.commit = commit
        if self._hardware is None:
            self._hardware = mf.hardware_info()
        m, files = mf.record_gates(mf.load(self.ws.read_file(rt.base, mf.MANIFEST)), spec=self.spec,
                                   spec_path=str(self.spec_path), spec_sha256=self.state.spec_sha256,
                                   engine_name=self.engine.name, stage=stage.name, round_no=rec.round, commit=commit,
                                   results=results, hardware=self._hardware, writer="forge",
                                   run={"run_id": self.state.run_id, "branch": self.ws.branch, "backend": rec.backend})
        if op is not None and leaderboard_path(self.state_dir, op).is_file():  # every candidate so far, harness-written
            files[f"{LEADERBOARDS}/{op}.json"] = leaderboard_path(self.state_dir, op).read_bytes()
        if op is not None and rec.timing is not None and stage.timing is not None:
            first = self.ledger.op_baseline(rec.key)
            baseline = first.value if first is not None else None
            m = mf.record_op(m, op=op, metric=stage.timing.metric, value=rec.timing, baseline=baseline, commit=commit,
                             round_no=rec.round)
        rec.wall_s = round(time.monotonic() - t_start, 3)
        files[mf.MANIFEST] = mf.dumps(m)
        files["forge/ledger.jsonl"] = self.ledger.copy_with(rec)
        tip = self.ws.commit_tree(self.ws.tree_with_files(tree, files), commit,
                                  f"forge({what}): manifest.json for {commit[:10]}\n\nForge-Run: {self.state.run_id}\n")
        rec.tip = tip
        rec.wall_s = round(time.monotonic() - t_start, 3)
        self.ledger.append(rec)            # the source of truth first: a kill after this is reconciled on resume
        self.ws.advance(tip, rt.base)
        if self.land:
            landed, why = self.ws.land()
            self.console.print(f"  {'landed' if landed else 'not landed'}: {why}")

    def _finish(self, rec: RoundRecord, rt: RoundTree, t_start: float, round_dir: Path,
                appended: bool = False) -> RoundRecord:
        assert self.ws is not None
        if not appended:
            rec.wall_s = round(time.monotonic() - t_start, 3)
            self.ledger.append(rec)
        self.ws.remove_round(rt.path)
        redact_tree(round_dir)  # logs, reports, patches: whatever an agent or an engine printed
        with self._inflight_lock:
            (self.state_dir / "inflight.json").unlink(missing_ok=True)
            self._inflight, self._meter = None, None
        if rec.verdict != "passed":
            self.console.print(f"  round {rec.round}: [red]{rec.verdict}[/]" + (f" ({redact(rec.note)})" if rec.note else ""))
        return rec


def _usage(meter: Meter) -> tuple[int | None, int | None, float | None]:
    """(tokens in, tokens out, cost) as the ledger records them: None where the backend reported nothing."""
    return (meter.tokens_in if meter.reported else None, meter.tokens_out if meter.reported else None,
            meter.cost_usd if meter.cost_reported else None)


def _agent_failed_note(error: str, snap: Snapshot, accepted: bool) -> str:
    """What an `error` round's gates said, in words (its edits are never committed)."""
    if not accepted:
        return f"the agent failed ({error}); the gates did not pass either"
    if not snap.changes:
        return f"the agent failed ({error}); the engine already passed this stage's gates before the round: nothing to commit"
    return f"the agent failed ({error}); its partial edits pass the gates but are not committed"
