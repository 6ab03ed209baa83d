"""The built-in `tune` backend and an ops stage: search a config space with a timing command, elect the
fastest candidate that passes the gates, commit it, record baseline and election in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from forge_toy import FIXED, fake_gate, make_repo, make_task, toy_spec, write_spec_file

from harness.agents import get_backend
from harness.ledger import Ledger
from harness.loop import ForgeLoop

BENCH = r'''
import json, sys
cfg = json.load(open("tuned.json"))["forward"]
block, warps = cfg["block"], cfg.get("warps", 4)
t = abs(block - 64) / 1000 + (0.002 if warps != 8 else 0.0) + 0.001
json.dump({"time_s": t, "block": block}, open(sys.argv[1], "w"))
'''


def _bench(tmp_path: Path) -> str:
    p = tmp_path / "bench.py"
    p.write_text(BENCH)
    return f"{{python}} {p} {{out}}"


def test_tune_grid_and_coordinate_descent(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws", FIXED)
    task = make_task(tmp_path, eng.parents[1], stage="ops", op="forward", log_dir=tmp_path / "log",
                     share=(tmp_path / "bench.py",),
                     extra={"timing": {"command": _bench(tmp_path), "metric": "time_s", "minimize": True}})
    space = {"{op}.block": [16, 32, 64, 128], "{op}.warps": [4, 8]}
    res = get_backend("tune", {"config_file": "tuned.json", "space": space}).run(task)
    assert res.error is None and res.turns == 8                         # the full grid
    assert json.loads((eng / "tuned.json").read_text()) == {"forward": {"block": 64, "warps": 8}}
    trials = json.loads((tmp_path / "log/tune_trials.json").read_text())
    assert min(t["time_s"] for t in trials) == 0.001

    (eng / "tuned.json").write_text('{"forward": {"block": 16}}\n')
    res = get_backend("tune", {"config_file": "tuned.json", "space": space, "max_trials": 6}).run(task)
    assert res.turns <= 6 and json.loads((eng / "tuned.json").read_text())["forward"] == {"block": 64, "warps": 8}


def test_tune_without_a_timing_command_is_an_error(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws", FIXED)
    task = make_task(tmp_path, eng.parents[1], stage="ops", op="forward", log_dir=tmp_path / "log")
    assert "no timing command" in get_backend("tune", {"config_file": "tuned.json", "space": {"a": [1]}}).run(task).error


def test_ops_stage_elects_the_fastest_correct_candidate(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws", FIXED)
    spec = toy_spec(eng, stages=("m1",))
    data = spec.model_dump(mode="python")
    data["engine"]["allowed_paths"].append("tuned.json")
    data["stages"].append({
        "name": "ops", "kind": "ops", "ops": ["forward"], "rounds": 2, "gates": [{"name": "m1_forward"}],
        "timing": {"command": _bench(tmp_path), "metric": "time_s"},
        "agent": {"backend": "tune", "share": [str(tmp_path / "bench.py")], "options": {"config_file": "tuned.json",
                                                  "space": {"{op}.block": [32, 64], "{op}.warps": [4, 8]}}}})
    from harness.spec import parse_spec

    spec = parse_spec(data)
    state = tmp_path / "s"
    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=fake_gate).run()
    assert out.ok, out.message
    ledger = Ledger(state / "ledger.jsonl")
    ops = [r for r in ledger.rounds() if r.stage == "ops"]
    assert [(r.round, r.verdict, r.elected, r.timing) for r in ops] == [(1, "passed", True, 0.001),
                                                                       (2, "failed", False, 0.001)]
    assert ops[1].note == "not faster"
    events = {e["event"]: e for e in ledger.records() if e["kind"] == "event"}
    assert events["op_baseline"]["value"] == pytest.approx(0.051) and events["op_done"]["best"] == 0.001
    manifest = json.loads((eng / "manifest.json").read_text())
    assert manifest["ops"]["forward"] == {"metric": "time_s", "value": 0.001, "baseline": pytest.approx(0.051),
                                          "commit": ops[0].commit, "round": 1}
    assert json.loads((eng / "tuned.json").read_text())["forward"] == {"block": 64, "warps": 8}
