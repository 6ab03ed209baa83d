"""A forge run in its own process, sealed as the CLI seals itself (the kill -9, signal and secrets tests): the toy
spec, the fake gate, and the shell backend running AGENT_SCRIPT (or the agent table given as JSON).

    python forge_driver.py ENGINE STATE AGENT_SCRIPT CTRL_DIR [--resume] [--sandbox MODE] [--agent JSON]
                           [--stages m1,m2] [--pause POINT] [--pause-key KEY] [--ops JSON]

The round sandbox is off unless --sandbox says otherwise (the agent then writes its markers to CTRL).
--pause POINT stops the run once at one of PAUSE_POINTS (the kill campaign): it touches CTRL/at-POINT and
sleeps, in the main thread, so a signal lands exactly there; at `gate` the gate first starts an engine
process of its own session (as gates/launch.py does), named $FORGE_TEST_MARK, and waits on it; at `agent` (for a
backend that runs in forge's own process: replay) the backend has made its edits and not yet returned, and touches
its outbox's at-agent as the agents that are processes do. --pause-key KEY stops only in or before a round of KEY
(`m1`, `ops-swiglu`): the points of a round and between rounds or stages; resume's points are the run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from forge_toy import fake_gate, toy_spec, write_spec_file  # noqa: E402

from harness.loop import ForgeLoop  # noqa: E402
from harness.secrets import seal  # noqa: E402
from harness.workspace import Workspace  # noqa: E402

PAUSE_POINTS = ("resume", "resume-orphans", "setup", "agent", "snapshot", "gate", "commit", "commit-ref",
                "between-rounds", "between-stages")
RUN_POINTS = ("resume", "resume-orphans")  # not in a round: --pause-key does not apply


def _arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


CURRENT = [""]  # the key of the round running or about to run


def _install_pause(point: str, ctrl: Path, only_key: str) -> None:
    """Patch the loop so that the run stops once at `point` (see PAUSE_POINTS), in a round of `only_key` if given."""
    fired: list[str] = []

    def due(at: str) -> bool:
        return at == point and not fired and not (only_key and at not in RUN_POINTS and CURRENT[0] != only_key)

    def pause(at: str) -> None:
        if not due(at):
            return
        fired.append(at)
        (ctrl / f"at-{at}").touch()
        time.sleep(300)

    def before(cls: type, name: str, at: str, when=lambda *a: True, after: bool = False) -> None:
        orig = getattr(cls, name)

        def wrapped(*a, **kw):
            if not after and when(*a, **kw):
                pause(at)
            out = orig(*a, **kw)
            if after and when(*a, **kw):
                pause(at)
            return out
        setattr(cls, name, wrapped)

    before(ForgeLoop, "_recover", "resume")                              # right after resume starts
    from harness.ledger import Ledger
    before(Ledger, "event", "resume-orphans", lambda self, run_id, event, **kw: event == "orphans_checked", after=True)
    before(ForgeLoop, "_feedback", "setup")                              # a round set up, its agent not started
    before(Workspace, "snapshot", "snapshot")                            # the agent done, its edits not taken
    before(Workspace, "tree_with_files", "commit")                       # the code commit made, the manifest's not
    before(Workspace, "advance", "commit-ref")                           # the ledger says passed, the ref not moved

    from harness.agents.replay import ReplayBackend
    replay_run = ReplayBackend.run

    def in_agent(self, task):  # an agent in forge's own process, its edits made, not yet returned
        out = replay_run(self, task)
        if due("agent"):
            (task.box.out_dir / "at-agent").touch()
            pause("agent")
        return out
    ReplayBackend.run = in_agent

    def judged_before(self, stage, op):
        recs = self._records(stage.name if op is None else f"{stage.name}-{op}")
        return bool(recs) and recs[-1].verdict in ("failed", "error", "rejected")
    before(ForgeLoop, "_round", "between-rounds", judged_before)
    before(ForgeLoop, "_round", "between-stages", lambda self, stage, op: stage is not self.spec.stages[0]
           and not any(r.stage == stage.name for r in self.ledger.rounds()))
    round_ = ForgeLoop._round

    def keyed(self, stage, op):  # outermost: the points before a round see its key
        CURRENT[0] = stage.name if op is None else f"{stage.name}-{op}"
        return round_(self, stage, op)
    ForgeLoop._round = keyed


def _gate(point: str, ctrl: Path, only_key: str):
    """The toy gate; at --pause gate, first an engine process that hangs in its own session."""
    def gate(*args):
        if point == "gate" and not (ctrl / "at-gate").exists() and CURRENT[0] == (only_key or CURRENT[0]):
            p = subprocess.Popen(["bash", "-c", f'touch {ctrl}/at-gate; exec -a "$FORGE_TEST_MARK" sleep 300'],
                                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            p.wait()
        return fake_gate(*args)
    return gate


def _step_clock(engine_dir: Path, timing, spec) -> tuple[float, str]:
    """A fake gates' clock: 1 ms with swiglu's block tuned to 512 in the engine's tuned file, else 51 ms."""
    tuned = json.loads((engine_dir / "src/train_engine_0_5b/tuned/configs.json").read_text())
    blocks = [e["ops"].get("swiglu", {}).get("triton_fused", {}).get("block") for e in tuned["entries"]]
    t = 0.001 if 512 in blocks else 0.051
    return t, f"{timing.metric}={t} (fake clock)"


def main() -> int:
    seal()
    engine, state, script, ctrl = (Path(a) for a in sys.argv[1:5])
    point = _arg("--pause", "")
    if point:
        _install_pause(point, ctrl, _arg("--pause-key", ""))
    agent = json.loads(_arg("--agent", "null")) or {
        "backend": "shell", "options": {"command": f"bash {script}"}, "env": {"CTRL": str(ctrl)},
        "sandbox": _arg("--sandbox", "off"), "share": [str(script), str(ctrl)]}
    spec = toy_spec(engine, stages=tuple(_arg("--stages", "m1,m2").split(",")), rounds=4, agent=agent)
    clock = None
    if "--ops" in sys.argv:  # an ops stage after them (its own agent, e.g. tune), timed by `_step_clock`
        from harness.spec import parse_spec
        data = spec.model_dump(mode="python")
        data["stages"].append(json.loads(_arg("--ops", "{}")))
        spec = parse_spec(data)
        clock = _step_clock
    spec_file = state.parent / "toy.toml"
    if not spec_file.exists():
        write_spec_file(spec_file)
    gate = _gate(point, ctrl, _arg("--pause-key", ""))
    out = ForgeLoop(spec, spec_file, engine=engine, state_dir=state, gate_fn=gate,
                    step_clock=clock).run(resume="--resume" in sys.argv)
    print(f"STATUS {out.status}", flush=True)
    return 0 if out.ok else (128 + out.signum if out.signum else 1)


if __name__ == "__main__":
    sys.exit(main())
