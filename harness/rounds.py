"""One round of the forge loop (ForgeLoop's `Rounds` part): the last judged round as feedback (its edits carried
over where the spec says so), the prompt, the agent in the round's sandbox with its process groups and usage kept in
inflight.json, the guard over the workspace's own code, the allowed-paths check, the per-op harness (ops stages),
the stage's gates, then the election and the commit (harness/election.py, harness/commit.py) or the feedback for the
next round; `_finish` writes the ledger line and ends the round's worktree and processes.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from harness.agents import AgentBackend, AgentResult, AgentTask, AgentUnavailable, get_backend
from harness.agents._env import agent_env
from harness.agents.base import AgentFatal, BudgetSpent, Meter
from harness.gating import GateOutcome, gate_line, load_report, report_localization
from harness.isolation import RoundBox, round_isolation
from harness.ledger import GateLine, Inflight, RoundRecord, write_json_atomic
from harness.loop_state import LoopParts
from harness.procs import TAG, Interrupted
from harness.prompts import WORKSPACE_ROOT, Feedback, render
from harness.secrets import redact, redact_tree
from harness.spec import AgentSpec, GateCheck, StageSpec
from harness.workspace import RoundTree, Snapshot


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


class Rounds(LoopParts):
    """ForgeLoop's rounds: `_round` runs one of a stage (or of one op of an ops stage) and returns its ledger line."""

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
        typed = load_report(report)
        return report_localization(typed) if typed else None

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
            rec.elected = None  # where no ledger line has it yet, its commit never landed: never the op's best
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
        if op:
            self._seed_round_cache(key, rt)
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
