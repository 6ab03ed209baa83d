"""The forge loop (DESIGN.md, "The harness loop").

For each stage of the spec: render the stage prompt with the last gate report, run the agent in a fresh
worktree, reject the round if it touched what it may not, run the stage's gates from the workspace's
own gate code, then commit (pass) or feed the report back (fail), within budgets. Every round is a
ledger line; the ledger and the state dir are all a killed run needs to resume (see harness/ledger.py).

Ops stages run per-op rounds: a candidate must pass the stage's gates and beat the op's best time
(the spec's timing command) to be elected and committed; an op ends when its rounds are spent.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from harness import manifest as mf
from harness.agents import AgentBackend, AgentResult, AgentTask, AgentUnavailable, get_backend
from harness.agents._env import agent_env, redact, secrets_withheld
from harness.agents._proc import kill_group
from harness.gating import GateFn, GateOutcome, report_localization, run_real_gate
from harness.ledger import GateLine, Inflight, Ledger, RoundRecord, RunLock, RunState, write_json_atomic
from harness.prompts import PROMPTS_DIR, WORKSPACE_ROOT, Feedback, OpContext, render
from harness.spec import ForgeSpec, GateCheck, StageSpec, spec_sha256
from harness.timing import run_gate_timing, run_timing
from harness.workspace import RoundTree, Workspace

GUARDED = ("harness", "gates", "prompts")   # the workspace's own code: must not change during a round


class ForgeError(RuntimeError):
    """A run that cannot start or continue (no state to resume, state of another spec, ...)."""


@dataclass
class RunOutcome:
    status: str                      # passed | budget | agent_unavailable | tampered
    message: str
    stages: dict[str, str] = field(default_factory=dict)
    branch: str | None = None
    tip: str | None = None
    state_dir: Path | None = None

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
                 land: bool | None = None, prompts_dir: Path = PROMPTS_DIR, guard: list[Path] | None = None) -> None:
        self.spec, self.spec_path = spec, Path(spec_path)
        self.engine = Path(engine).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.gate_fn: GateFn = gate_fn or run_real_gate
        self.backend_override = backend
        self.console = console or Console(stderr=True)
        self.land = spec.loop.land if land is None else land
        self.prompts_dir = prompts_dir
        self.guard = guard if guard is not None else [WORKSPACE_ROOT / d for d in GUARDED] + [self.spec_path]
        self.ledger = Ledger(self.state_dir / "ledger.jsonl")
        self.state: RunState | None = None
        self.ws: Workspace | None = None
        self._inflight: Inflight | None = None
        self._hardware: dict | None = None

    # -- entry ---------------------------------------------------------------------------------------
    def run(self, resume: bool = False, only: list[str] | None = None) -> RunOutcome:
        if self.backend_override is None:  # bad backend options fail here, before any state is written
            for st in self.spec.stages:
                a = self.spec.agent_for(st)
                get_backend(a.backend, a.options, a.model)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.state_dir):
            self._start(resume)
            assert self.state is not None and self.ws is not None
            statuses = {s.name: ("passed" if self._stage_passed(s) else "pending") for s in self.spec.stages}
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

    def _outcome(self, status: str, message: str, stages: dict[str, str]) -> RunOutcome:
        assert self.ws is not None
        return RunOutcome(status, message, stages, self.ws.branch, self.ws.branch_tip(), self.state_dir)

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
                for pid in inf.pids:
                    kill_group(pid)
                done = any(r.key == inf.key and r.round == inf.round for r in self.ledger.rounds())
                if not done:
                    self.ledger.append(RoundRecord(run_id=run_id, stage=inf.stage, op=inf.op, round=inf.round,
                                                   backend=inf.backend, prompt_sha256=inf.prompt_sha256,
                                                   wall_s=time.time() - inf.started, verdict="interrupted",
                                                   counted=False, note="the forge run was killed during this round"))
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
        return [r for r in self.ledger.rounds() if r.key == key]

    def _stage_passed(self, stage: StageSpec) -> bool:
        if stage.kind == "ops":
            done = {e.get("op") for e in self.ledger.records() if e.get("event") == "op_done" and e.get("stage") == stage.name}
            return all(op in done for op in stage.ops)
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
                self.console.print(f"[green]stage {stage.name} passed in round {rec.round}[/] (commit {rec.commit[:10]})")
                return "passed", f"stage {stage.name} passed"
            if rec.verdict in ("agent_unavailable", "tampered"):
                return rec.verdict, rec.note or rec.verdict

    def _ops_stage(self, stage: StageSpec) -> tuple[str, str]:
        assert self.state is not None
        limit = self.spec.rounds_for(stage)
        for op in stage.ops:
            key = f"{stage.name}-{op}"
            if any(e.get("event") == "op_done" and e.get("stage") == stage.name and e.get("op") == op
                   for e in self.ledger.records()):
                continue
            while not self._rounds_spent(key, limit):  # spent rounds end the op: its best stays elected
                stop = self._run_budget_stop()
                if stop:
                    self.console.print(f"[red]stage {stage.name} stopped: {stop}[/]")
                    return "budget", stop
                rec = self._round(stage, op=op)
                if rec.verdict in ("agent_unavailable", "tampered"):
                    return rec.verdict, rec.note or rec.verdict
            best = self._op_best(key)
            self.ledger.event(self.state.run_id, "op_done", stage=stage.name, op=op, best=best[0], best_round=best[1])
            self.console.print(f"op {op}: best {best[0]} (round {best[1]})")
        return "passed", f"stage {stage.name}: every op has had its rounds"

    def _op_best(self, key: str) -> tuple[float | None, int | None]:
        elected = [r for r in self._records(key) if r.elected and r.timing is not None]
        if elected:
            return elected[-1].timing, elected[-1].round
        for e in self.ledger.records():
            if e.get("event") == "op_baseline" and e.get("key") == key:
                return e.get("value"), None
        return None, None

    # -- one round -----------------------------------------------------------------------------------
    def _feedback(self, key: str, base: str) -> tuple[Feedback | None, Path | None]:
        """The last judged round of `key` as feedback, and its patch when its edits carry over."""
        judged = [r for r in self._records(key) if r.verdict in ("failed", "rejected")]
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

    def _record_pid(self, pid: int) -> None:
        if self._inflight is not None:
            self._inflight.pids.append(pid)
            write_json_atomic(self.state_dir / "inflight.json", self._inflight)

    def _round(self, stage: StageSpec, op: str | None) -> RoundRecord:
        assert self.state is not None and self.ws is not None
        key = stage.name if op is None else f"{stage.name}-{op}"
        records = self._records(key)
        round_no = max((r.round for r in records), default=0) + 1
        name = f"{key}-r{round_no:02d}"
        round_dir = self.state_dir / "rounds" / name
        round_dir.mkdir(parents=True, exist_ok=True)
        agent_spec = self.spec.agent_for(stage)
        backend = self.backend_override or get_backend(agent_spec.backend, agent_spec.options, agent_spec.model)
        t_start = time.monotonic()
        rt = self.ws.create_round(name)
        feedback, carry_patch = self._feedback(key, rt.base)
        if carry_patch is not None and not self.ws.apply_patch(rt, carry_patch):
            feedback.carried = False  # type: ignore[union-attr]
        op_ctx = self._op_context(stage, key, op, rt) if op else None
        prompt = render(self.spec, stage, prompts_dir=self.prompts_dir, round_no=round_no,
                        max_rounds=self.spec.rounds_for(stage), engine_dir=rt.engine_dir, feedback=feedback, op=op_ctx)
        prompt_file = round_dir / "prompt.md"
        prompt_file.write_text(prompt)
        prompt_sha = hashlib.sha256(prompt.encode()).hexdigest()
        self._inflight = Inflight(key=key, stage=stage.name, op=op, round=round_no, worktree=str(rt.path),
                                  prompt_sha256=prompt_sha, backend=backend.name)
        write_json_atomic(self.state_dir / "inflight.json", self._inflight)
        rec = RoundRecord(run_id=self.state.run_id, stage=stage.name, op=op, round=round_no, backend=backend.name,
                          model=agent_spec.model, prompt_sha256=prompt_sha, base=rt.base, verdict="failed")
        self.console.print(f"[bold]{key} round {round_no}[/] · {backend.name} · prompt {prompt_sha[:10]}")
        env = agent_env(agent_spec.env_allow, agent_spec.env)
        task = AgentTask(stage=stage.name, round=round_no, prompt=prompt, prompt_file=prompt_file, worktree=rt.path,
                         engine_dir=rt.engine_dir, env=env, op=op, log_dir=round_dir / "agent",
                         timeout_s=min(agent_spec.timeout_s, self._remaining_wall()), on_spawn=self._record_pid,
                         extra={"package": self.spec.engine.package,
                                "timing": stage.timing.model_dump() if stage.timing else None})
        guard_before = fingerprint(self.guard)
        t_agent = time.monotonic()
        try:
            result = backend.run(task)
        except AgentUnavailable as e:
            rec.verdict, rec.counted, rec.note = "agent_unavailable", False, str(e)
            return self._finish(rec, rt, t_start)
        except Exception as e:  # noqa: BLE001 - a crashing backend is a result of the round
            result = AgentResult(error=f"backend raised {type(e).__name__}: {e}")
        rec.agent_s = round(time.monotonic() - t_agent, 3)
        rec.tokens_in, rec.tokens_out, rec.cost_usd = result.tokens_in, result.tokens_out, result.cost_usd
        rec.agent_error = result.error
        (round_dir / "agent" / "result.json").parent.mkdir(parents=True, exist_ok=True)
        (round_dir / "agent" / "result.json").write_text(json.dumps(result.__dict__, indent=2, default=str) + "\n")
        if fingerprint(self.guard) != guard_before:
            rec.verdict = "tampered"
            rec.note = "the workspace's own harness/gates/prompts/spec changed during the round; the run stops"
            self.console.print(f"[red]{rec.note}[/]")
            return self._finish(rec, rt, t_start)
        snap = self.ws.snapshot(rt)
        (round_dir / "changes.patch").write_text(self.ws.patch(rt, snap) if snap.changes else "")
        rec.diff, rec.changed = snap.stat(), snap.paths[:50]
        rec.forbidden = self.ws.forbidden(snap, self.spec.engine.allowed_paths)
        if rec.forbidden:
            rec.verdict = "rejected"
            self.console.print(f"[red]round rejected: changed {', '.join(rec.forbidden[:5])}[/]")
            return self._finish(rec, rt, t_start)
        results = self._run_gates(stage, rt, round_dir / "gates", rec)
        accepted = all(out.accepted(g) for g, out in results) and len(results) == len(self._gates_for(stage))
        if accepted and op is not None:
            accepted = self._elect(stage, key, op, rt, rec, op_ctx)
        if not accepted:
            return self._finish(rec, rt, t_start)
        rec.verdict = "passed"
        self._commit(stage, rec, rt, snap.tree, results, op, t_start)
        return self._finish(rec, rt, t_start, appended=True)

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
            with secrets_withheld():  # the engine under test is agent-written code: no keys in its environment
                out = self.gate_fn(gate, rt.engine_dir, self.spec, out_dir / f"{i:02d}-{gate.name}")
            results.append((gate, out))
            rec.gates.append(GateLine(name=gate.name, verdict=out.verdict, metrics=out.key_numbers(), time_s=out.time_s,
                                      report=str(out.report) if out.report else None))
            style = "green" if out.accepted(gate) else "red"
            self.console.print(f"  gate {gate.name}: [{style}]{out.verdict}[/] {out.key_numbers(4)}")
            if not out.accepted(gate):
                if out.localization:
                    self.console.print(f"    [dim]{out.localization.splitlines()[0][:160]}[/]")
                break
        rec.gate_s = round(time.monotonic() - t0, 3)
        return results

    def _op_context(self, stage: StageSpec, key: str, op: str, rt: RoundTree) -> OpContext:
        timing = stage.timing
        assert timing is not None, f"ops stage {stage.name} needs [stages.timing]"
        best, best_round = self._op_best(key)
        if best is None and not any(e.get("event") == "op_baseline" and e.get("key") == key for e in self.ledger.records()):
            env = agent_env(self.spec.agent.env_allow, self.spec.agent.env)
            best, note = self._time(timing, rt, env, op)
            assert self.state is not None
            self.ledger.event(self.state.run_id, "op_baseline", key=key, op=op, value=best, note=note)
            self.console.print(f"op {op}: baseline {note}")
        return OpContext(name=op, metric=timing.metric, minimize=timing.minimize, timing_command=timing.command,
                         best=best, best_round=best_round)

    def _time(self, timing, rt: RoundTree, env: dict[str, str], op: str) -> tuple[float | None, str]:
        """A candidate's figure: on the gates' clock, unless the spec names a command."""
        if timing.command is None:
            return run_gate_timing(rt.engine_dir, case=self.spec.model.preset, device=self.spec.hardware.device,
                                   metric=timing.metric, timeout_s=timing.timeout_s, options=timing.options)
        return run_timing(timing.command, engine_dir=rt.engine_dir, env=env, package=self.spec.engine.package, op=op,
                          metric=timing.metric, timeout_s=timing.timeout_s)

    def _elect(self, stage: StageSpec, key: str, op: str, rt: RoundTree, rec: RoundRecord, ctx: OpContext | None) -> bool:
        timing = stage.timing
        assert timing is not None and ctx is not None
        env = agent_env(self.spec.agent.env_allow, self.spec.agent.env)
        value, note = self._time(timing, rt, env, op)
        rec.timing = value
        better = value is not None and (ctx.best is None or (value < ctx.best if timing.minimize else value > ctx.best))
        rec.elected = better
        rec.note = None if better else ("not faster" if value is not None else note)
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
        m = mf.load(self.ws.read_file(rt.base, mf.MANIFEST))
        files: dict[str, bytes] = {}
        for g, o in results:
            if o.accepted(g) and o.report and Path(o.report).is_file():
                files[f"forge/reports/{g.name}.json"] = Path(o.report).read_bytes()
        m = mf.record_gates(m, spec=self.spec, spec_path=str(self.spec_path), spec_sha256=self.state.spec_sha256,
                            engine_name=self.engine.name, stage=stage.name, round_no=rec.round, commit=commit,
                            results=results, hardware=self._hardware, run_id=self.state.run_id,
                            branch=self.ws.branch, backend=rec.backend)
        for g, o in results:
            if g.name in m["gates"] and f"forge/reports/{g.name}.json" in files:
                m["gates"][g.name]["report"] = f"forge/reports/{g.name}.json"
        if op is not None and rec.timing is not None and stage.timing is not None:
            baseline = next((e.get("value") for e in self.ledger.records()
                             if e.get("event") == "op_baseline" and e.get("key") == rec.key), None)
            m = mf.record_op(m, op=op, metric=stage.timing.metric, value=rec.timing, baseline=baseline, commit=commit,
                             round_no=rec.round)
        rec.wall_s = round(time.monotonic() - t_start, 3)
        ledger_lines = [json.dumps(r, sort_keys=True) for r in self.ledger.records()]
        files[mf.MANIFEST] = mf.dumps(m)
        files["forge/ledger.jsonl"] = ("\n".join(ledger_lines + [rec.model_dump_json()]) + "\n").encode()
        tip = self.ws.commit_tree(self.ws.tree_with_files(tree, files), commit,
                                  f"forge({what}): manifest.json for {commit[:10]}\n\nForge-Run: {self.state.run_id}\n")
        rec.tip = tip
        rec.wall_s = round(time.monotonic() - t_start, 3)
        self.ledger.append(rec)            # the source of truth first: a kill after this is reconciled on resume
        self.ws.advance(tip, rt.base)
        if self.land:
            landed, why = self.ws.land()
            self.console.print(f"  {'landed' if landed else 'not landed'}: {why}")

    def _finish(self, rec: RoundRecord, rt: RoundTree, t_start: float, appended: bool = False) -> RoundRecord:
        assert self.ws is not None
        if not appended:
            rec.wall_s = round(time.monotonic() - t_start, 3)
            self.ledger.append(rec)
        self.ws.remove_round(rt.path)
        inflight = self.state_dir / "inflight.json"
        if inflight.exists():
            os.unlink(inflight)
        self._inflight = None
        if rec.verdict != "passed":
            self.console.print(f"  round {rec.round}: [red]{rec.verdict}[/]" + (f" ({redact(rec.note)})" if rec.note else ""))
        return rec
