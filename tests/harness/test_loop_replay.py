"""The full loop end to end with the replay backend: a broken engine, a failing round whose report feeds
the next prompt, a passing round committed (with manifest.json) and landed on the checked-out branch."""

from __future__ import annotations

import json
from pathlib import Path

from harness.ledger import Ledger
from harness.loop import ForgeLoop
from forge_toy import FIXED, MODEL_PY, PARTIAL, fake_gate, git, make_repo, patch_between, toy_spec, write_spec_file


def test_replay_fixes_broken_engine_on_round_two(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws")
    rec = tmp_path / "recording"
    rec.mkdir()
    (rec / "m1-r1.patch").write_text(patch_between(eng, PARTIAL))   # a wrong fix: the gate fails it
    (rec / "m1-r2.patch").write_text(patch_between(eng, FIXED))     # the right one
    spec = toy_spec(eng, options={"recording": str(rec)})
    state = tmp_path / "state"
    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=fake_gate).run()

    assert out.ok, out.message
    rounds = Ledger(state / "ledger.jsonl").rounds()
    assert [(r.stage, r.round, r.verdict) for r in rounds] == [("m1", 1, "failed"), ("m1", 2, "passed"), ("m2", 1, "passed")]
    r1, r2, m2 = rounds
    assert r1.gates[0].metrics["max_abs_err"] == 1.0 and r1.commit is None
    assert r2.diff == {"files": 1, "insertions": 1, "deletions": 1} and r2.prompt_sha256 != r1.prompt_sha256
    assert m2.commit == r2.tip and m2.diff["files"] == 0   # no edit: the judged code is the tip round 2 left

    # The failing round's localization is in round 2's prompt.
    prompt2 = (state / "rounds/m1-r02/prompt.md").read_text()
    assert "Round 1 ended **failed**" in prompt2 and "element 0 (x=0.5): engine 2.0, reference 2.0" not in prompt2
    assert "forward: element 0 (x=0.5): engine 3.0, reference 2.0" in prompt2

    # The commit landed on the checked-out branch: code, manifest and ledger copy.
    root = tmp_path / "ws"
    assert (eng / MODEL_PY).read_text() == FIXED
    log = git(root, "log", "--format=%s", "main")
    assert "forge(m1): m1_forward passed (round 2, replay)" in log
    manifest = json.loads((eng / "manifest.json").read_text())
    assert manifest["gates"]["m1_forward"]["verdict"] == "passed"
    assert manifest["gates"]["m1_forward"]["commit"] == r2.commit
    assert manifest["gates"]["m2_backward"]["metrics"]["max_abs_err"] == 0.0
    assert manifest["spec"]["name"] == "toy" and "hardware" in manifest["gates"]["m1_forward"]
    assert git(root, "show", f"{r2.commit}:exports/toy_engine/{MODEL_PY}") + "\n" == FIXED
    committed = [json.loads(x) for x in (eng / "forge/ledger.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in committed if r["kind"] == "round"] == ["failed", "passed", "passed"]
    assert (eng / "forge/reports/m1_forward.json").is_file()
    # No worktree or in-flight marker is left behind.
    assert git(root, "worktree", "list").count("\n") == 0
    assert not (state / "inflight.json").exists() and not any((state / "worktrees").iterdir())


def test_second_run_without_resume_is_refused(tmp_path: Path) -> None:
    import pytest

    from harness.loop import ForgeError

    eng = make_repo(tmp_path / "ws", FIXED)
    spec = toy_spec(eng, stages=("m1",))
    sf = write_spec_file(tmp_path / "toy.toml")
    assert ForgeLoop(spec, sf, engine=eng, state_dir=tmp_path / "s", gate_fn=fake_gate).run().ok
    with pytest.raises(ForgeError, match="--resume"):
        ForgeLoop(spec, sf, engine=eng, state_dir=tmp_path / "s", gate_fn=fake_gate).run()
    again = ForgeLoop(spec, sf, engine=eng, state_dir=tmp_path / "s", gate_fn=fake_gate).run(resume=True)
    assert again.ok and len(Ledger(tmp_path / "s/ledger.jsonl").rounds()) == 1   # nothing redone
