"""The commit of a passing round (ForgeLoop's `Commit` part): the code commit (when the round changed anything),
then the manifest commit beside it (harness/manifest.py's recorder, the accepted gates' reports, the op's leaderboard
and elected value, the ledger's copy); the ledger line first, then the branch ref, then the landing.
"""

from __future__ import annotations

import time

from gates.ops.harness import LEADERBOARDS
from gates.ops.harness import leaderboard_path
from harness import manifest as mf
from harness.gating import GateOutcome
from harness.ledger import RoundRecord
from harness.loop_state import LoopParts
from harness.spec import GateCheck, StageSpec
from harness.workspace import RoundTree


class Commit(LoopParts):
    """ForgeLoop's commit of a passing round."""

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
