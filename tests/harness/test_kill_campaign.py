"""The kill campaign (issue 25, "Done when"): every backend's forge run is killed with kill -9 or Ctrl-C (SIGINT) at
ten points of a round and of the run around it, and resumed after each kill. After every kill and at every point:
nothing of an earlier round is alive (by marker, by the round tag in its environment, by the process groups that
inflight.json recorded); the ledger plus the round in flight hold exactly the tokens the fake service served (no
double count, no loss); the planted keys are in no file of the run (state, logs, worktrees, the repository), in
no git object, in no request sent to the service, and in no live process's environment but the CLI agent's own,
inside its sandbox, though the agents hunt for them (the shell agent reads forge's environment, an API model's tool
command every environment in its sandbox, and the CLIs write their own key where they may). At the end every round
is recorded once, with the verdicts the schedule implies.

The points (forge_driver.py --pause, plus the agent's own hang): setup (a round set up, its agent not started),
agent (a CLI agent, an API tool command, a shell agent's child in a session of its own, a tune trial, or replay
inside forge, is running), resume-orphans (resume ended the orphans, the interrupted round not yet recorded),
resume (right after resume starts), snapshot (the agent done, its edits not yet taken), between-rounds (a judged
round that did not pass, the next not started), gate (an engine process of its own session runs under the gate),
commit (the code commit made, the manifest commit not), commit-ref (the ledger says passed, the branch not
moved), between-stages (a stage passed, the next not started).

Schedules A and B give every point both kill -9 and SIGINT; every gates-stage backend runs both. tune's points
are those of its ops stage (after m1, which replay passes), in orders that keep each reachable (between-stages
first; the election, which only one round wins, at commit-ref last), T1 and T2 with the signals swapped. Each
forge process imports torch (harness.isolation -> gates.sandbox -> gates.context): a step costs 2-4 s, a tune step
(its trials in Triton's CPU interpreter) 20-30 s, hence the slow tier."""

from __future__ import annotations

from pathlib import Path

import pytest
from kill_campaign import API_ROUTE, FINAL, POINTS, Campaign, I, K
from wire_servers import Script, serve

from harness.ledger import OpDone

SCHEDULES = {
    "A": [("setup", I), ("agent", K), ("resume-orphans", I), ("resume", K), ("snapshot", I), ("between-rounds", K),
          ("gate", I), ("commit", K), ("commit-ref", I), ("between-stages", K)],
    "B": [("agent", I), ("setup", K), ("resume-orphans", K), ("resume", I), ("snapshot", K), ("between-rounds", I),
          ("gate", K), ("commit", I), ("commit-ref", K), ("between-stages", I)],
    "T1": [("between-stages", K), ("setup", I), ("agent", K), ("resume-orphans", I), ("resume", K), ("snapshot", I),
           ("between-rounds", K), ("gate", I), ("commit", K), ("commit-ref", I)],
    "T2": [("between-stages", I), ("agent", I), ("setup", K), ("resume-orphans", K), ("resume", I), ("snapshot", K),
           ("between-rounds", I), ("gate", K), ("commit", I), ("commit-ref", K)],
}
GATES_BACKENDS = ("shell", "codex", "claude_code", "anthropic", "openai", "replay")
# m1's rounds under A or B: setup/agent, agent/setup, snapshot interrupted; between-rounds' round failed; gate and
# commit interrupted; commit-ref's passed (the ledger line came first). m2 passes in the last resume.
GATES_VERDICTS = {"m1": ["interrupted"] * 3 + ["failed"] + ["interrupted"] * 2 + ["passed"], "m2": ["passed"]}
# the op's rounds under T: setup, agent, snapshot interrupted; the partial trial's round an error; gate and commit
# interrupted; commit-ref's elected; the last resume's round not faster than it.
OPS_VERDICTS = ["interrupted"] * 3 + ["error"] + ["interrupted"] * 2 + ["passed", "failed"]
PAYING = ("shell", "codex", "claude_code", "openai", "anthropic")


def _run(c: Campaign, schedule: str) -> None:
    points = [p for p, _ in SCHEDULES[schedule]]
    assert sorted(points) == sorted(POINTS)
    for i, (point, sig) in enumerate(SCHEDULES[schedule], start=1):
        if point == "resume-orphans":  # each schedule kills mid-round just before: resume has orphans to end
            assert (c.state / "inflight.json").exists()
        c.step(i, point, sig)
    c.step(FINAL, None, None)
    c.check_no_leftovers(FINAL + 1)
    c.check_keys(None)
    c.check_storage()
    c.check_probes()
    assert not (c.state / "inflight.json").exists()
    rounds = c.ledger().rounds()
    assert len({(r.key, r.round) for r in rounds}) == len(rounds), "a round recorded twice"
    totals = c.ledger().totals()
    assert (totals["tokens_in"], totals["tokens_out"]) == c.served()
    assert (c.served()[0] > 0) == (c.backend in PAYING)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["A", "B"])
@pytest.mark.parametrize("backend", GATES_BACKENDS)
def test_kill_campaign(backend: str, schedule: str, tmp_path: Path) -> None:
    script = Script([])
    with serve(script, API_ROUTE.get(backend, "/none")) as url:
        c = Campaign(tmp_path, backend, script if backend in API_ROUTE else None, url)
        _run(c, schedule)
    rounds = c.ledger().rounds()
    verdicts = {k: [r.verdict for r in rounds if r.key == k] for k in ("m1", "m2")}
    assert verdicts == GATES_VERDICTS, verdicts
    assert [r.round for r in rounds if r.key == "m1"] == list(range(1, 8))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["T1", "T2"])
def test_kill_campaign_tune(schedule: str, tmp_path: Path) -> None:
    """tune: the ten points in its ops stage (a trial's child process, in the round sandbox, at the agent point);
    the elected candidate is committed once."""
    c = Campaign(tmp_path, "tune")
    _run(c, schedule)
    rounds = [r for r in c.ledger().rounds() if r.stage == "ops"]
    assert [r.verdict for r in rounds] == OPS_VERDICTS, [(r.round, r.verdict, r.note) for r in rounds]
    assert [r.round for r in rounds] == list(range(1, 9))
    (won,) = [r for r in rounds if r.elected]
    assert won.verdict == "passed" and won.timing == 0.001 and won.commit
    (done,) = c.ledger().events(OpDone)  # the op's best is the round whose commit landed
    assert (done.best, done.best_round) == (0.001, won.round)
