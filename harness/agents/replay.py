"""`replay`: applies recorded patches instead of asking a model (demos, tests, re-running a forge run).

A recording is a directory of patches, one per round, each the diff from the round's base commit to
the end of that round (what the loop saves as `rounds/<key>-rNN/changes.patch`):

    <recording>/<key>-r<N>.patch   or   <recording>/<key>-r<N>/changes.patch   (N with or without zero pad)

where <key> is the stage name (`m1`) or, in ops stages, `<stage>-<op>`. A round without a patch makes
no edit (or is an error with `strict = true`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from harness import launcher
from harness.agents.base import AgentBackend, AgentResult, AgentTask


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recording: str | None = None
    strict: bool = False


def find_patch(recording: Path, key: str, round_no: int) -> Path | None:
    for r in (f"r{round_no}", f"r{round_no:02d}"):
        for p in (recording / f"{key}-{r}.patch", recording / f"{key}-{r}" / "changes.patch"):
            if p.is_file():
                return p
    return None


def _git(worktree: Path, *args: str) -> launcher.Finished:
    return launcher.run(["git", *args], cwd=worktree)


class ReplayBackend(AgentBackend):
    name = "replay"
    Options = ReplayOptions

    def run(self, task: AgentTask) -> AgentResult:
        task.meter.add(0, 0, 0.0)  # offline and free
        if not self.options.recording:
            return AgentResult(summary="replay: no recording; no edits")
        key = task.stage if task.op is None else f"{task.stage}-{task.op}"
        patch = find_patch(Path(self.options.recording), key, task.round)
        if patch is None:
            note = f"replay: no patch for {key} round {task.round}"
            return AgentResult(summary=note + "; no edits",
                               error="missing patch" if self.options.strict else None)
        # The patch is relative to the round's base commit: drop carried edits first.
        _git(task.worktree, "reset", "-q", "--hard")
        _git(task.worktree, "clean", "-fdq")
        r = _git(task.worktree, "apply", "--whitespace=nowarn", str(patch.resolve()))
        if r.returncode != 0:
            return AgentResult(summary=f"replay: {patch.name} does not apply", error=f"git apply: {r.stderr.strip()[:300]}")
        return AgentResult(summary=f"replay: applied {patch}")
