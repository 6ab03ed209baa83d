"""The election of ops stages (ForgeLoop's `Election` part): before any state, every op of the stage is one the
engine declares and the clock is the gates' own; per op, the baseline on that clock; per round, the per-op harness
(the candidate's op checked against its reference, the tune trials put on the op's leaderboard) and then the
whole step on the gates' clock (timing.py: M5's speed part), elected only if faster than the op's best by more than
ELECTION_MARGIN. The engine's own timings are never read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gates.launch import EngineLayoutError, discover_engine, save_engine_cache, seed_engine_cache
from gates.ops.harness import CandidateResult, HarnessOptions, OpSpecError, check_candidate, describe
from gates.ops.harness import record as record_op_result
from harness.agents._env import agent_env
from harness.agents.tune import TRIALS, TuneError, TuneOptions, check_options, round_runner
from harness.isolation import RoundBox
from harness.ledger import RoundRecord
from harness.loop_state import ForgeError, LoopParts
from harness.procs import TAG
from harness.prompts import OpContext, op_material
from harness.spec import StageSpec
from harness.workspace import RoundTree

ELECTION_MARGIN = 0.01  # a step time within 1 % of the best is noise, not an election


def beats(value: float, best: float, minimize: bool) -> bool:
    """The election's rule: `value` is better than `best` by more than ELECTION_MARGIN."""
    gain = 1 + ELECTION_MARGIN
    return value * gain < best if minimize else value > best * gain


class Election(LoopParts):
    """ForgeLoop's election for ops stages."""

    def _op_best(self, key: str) -> tuple[float | None, int | None]:
        elected = [r for r in self._records(key) if r.elected and r.timing is not None]
        if elected:
            return elected[-1].timing, elected[-1].round
        baseline = self.ledger.op_baseline(key)
        return (baseline.value, None) if baseline is not None else (None, None)


    def _cache_seed(self, key: str) -> Path:
        return self.state_dir / "compile-cache-seed" / key

    def _save_cache_seed(self, key: str, rt: RoundTree) -> None:
        """After the baseline timing, before any agent ran in the round: the compile caches of the branch's engine,
        which every later round of `key` starts from (each round is a new location, and so a cold cache). Ops run
        one after another, so the seeds of earlier ops go (a GPU's caches are GBs)."""
        seeds = self._cache_seed(key).parent
        for old in seeds.iterdir() if seeds.is_dir() else ():
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True)
        try:
            save_engine_cache(discover_engine(rt.engine_dir), self._cache_seed(key))
        except (EngineLayoutError, OSError) as e:
            self.console.print(f"  [yellow]no compile-cache seed for {key}: {e}[/]")

    def _seed_round_cache(self, key: str, rt: RoundTree) -> None:
        """A new round of `key` starts from the baseline's compile caches (nothing before the baseline ran)."""
        try:
            seed_engine_cache(discover_engine(rt.engine_dir), self._cache_seed(key))
        except (EngineLayoutError, OSError) as e:
            self.console.print(f"  [yellow]round starts with a cold compile cache: {e}[/]")

    def _check_ops_stage(self, stage: StageSpec) -> None:
        """Before any state: the election's clock is the gates' own, and every op is one the engine declares."""
        assert stage.timing is not None
        if stage.timing.command is not None:
            raise ForgeError(f"stage {stage.name}: [stages.timing].command is not read: elections run on the gates' "
                             "clock (M5's speed part); remove it (the tune backend's own figure is the per-op harness's)")
        try:
            table = describe(self.engine, tp=self.spec.hardware.tp)
        except OpSpecError as e:
            raise ForgeError(f"stage {stage.name}: {e}") from None
        unknown = [why for op in stage.ops if (why := table.unknown(op)) is not None]
        if unknown:
            raise ForgeError(f"stage {stage.name}: {'; '.join(unknown)}")
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
            self._save_cache_seed(key, rt)
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
        better = value is not None and ctx.best is not None and beats(value, ctx.best, timing.minimize)
        rec.elected = better
        rec.note = None if better else (note if value is None else "not faster on the gates' clock" if ctx.best is
                                        not None else "the baseline has no time on the gates' clock: nothing to beat")
        self.console.print(f"  timing {note}; best so far {ctx.best}; {'elected' if better else 'not elected'}")
        return better
