"""benchmarks/gpu/elect.py, stage 2's integration gate for one candidate: the loop's rule on the gates' clock, the
candidate engine it builds, and what it refuses; the timings faked (M5's speed part has its own tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu import elect
from harness.election import ELECTION_MARGIN

ENGINE = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B"


def timing(which: str, step: float | None, verdict: str = "passed") -> dict:
    return {"which": which, "verdict": verdict, "numbers": {} if step is None else {"step_time_s": step}}


@pytest.mark.parametrize("timings, elected, why", [
    ([timing("before", 1.0), timing("after", 0.95)], True, "faster"),
    ([timing("before", 1.0), timing("after", 1.0 / (1 + ELECTION_MARGIN) + 1e-6)], False, "not faster"),
    ([timing("before", 1.2), timing("after", 0.95), timing("before", 0.955)], False, "not faster"),  # the best before
    ([timing("before", 1.0), timing("after", 0.5, verdict="failed")], False, "no time"),
    ([timing("before", None, verdict="error"), timing("after", 0.5)], False, "no time"),
])  # fmt: skip
def test_the_loops_rule_on_the_best_of_each_side(timings, elected, why):
    d = elect.decide(timings)
    assert d["elected"] is elected and why in d["why"]


def run(tmp_path, monkeypatch, steps: dict[str, float], extra: list[str], loss: str | None = None) -> dict:
    """elect.main with the step timed as `steps[which]` and the op counted as running in the step."""
    seen: list[Path] = []

    def fake_time(engine, a):
        seen.append(engine)
        which = "before" if engine == ENGINE.resolve() else "after"
        return {"verdict": "passed", "message": "", "numbers": {"step_time_s": steps[which]}, "gate_s": 0.0}

    monkeypatch.setattr(elect, "time_step", fake_time)
    monkeypatch.setattr(elect, "idle_ops", lambda engine, ops, device: [])
    if loss is not None:
        from gates.report import GateReport, Part

        def fake_gate(name, engine, options):
            assert options.m5_parts == "loss" and engine == tmp_path / "candidate" / ENGINE.name
            return GateReport(gate=name, verdict=loss, parts=[Part(name="loss", verdict=loss, message="m")])

        monkeypatch.setattr("gates.runner.run_gate", fake_gate)
    assert elect.main(["--out", str(tmp_path), "--device", "cpu", *extra]) == 0
    report = json.loads((tmp_path / "election.json").read_text())
    assert [t["which"] for t in report["timings"]] == ["before", "after"] and len(seen) == 2
    return report


def test_the_candidate_is_an_engine_copy_with_its_values_under_this_runtime(tmp_path, monkeypatch):
    report = run(tmp_path, monkeypatch, {"before": 1.0, "after": 0.9},
                 ["--set", "adamw=triton_fused", "--values", '{"block": 512}', "--loss-steps", "5"], loss="passed")
    tuned = json.loads((tmp_path / "candidate_tuned.json").read_text())
    assert not (tmp_path / "candidate").exists()  # the engine copy goes; its tuned file stays beside the report
    (entry,) = tuned["entries"]
    assert entry["key"] == report["runtime_key"] and entry["ops"] == {"adamw": {"triton_fused": {"block": 512}}}
    assert "candidate" in entry["note"]  # not "elected": the file is written before anything is timed
    assert report["decision"]["elected"] and report["loss_part"]["verdict"] == "passed"
    original = json.loads((ENGINE / "src" / "train_engine_0_5b" / "tuned" / "configs.json").read_text())
    assert original == {"entries": []}  # the engine itself is untouched


@pytest.mark.parametrize("loss, why", [(None, "was not run"), ("failed", "is failed on the candidate")])
def test_faster_is_not_elected_without_the_loss_part(tmp_path, monkeypatch, loss, why):
    extra = ["--set", "adamw=triton_fused", "--values", '{"num_warps": 8}'] + (["--loss-steps", "5"] if loss else [])
    report = run(tmp_path, monkeypatch, {"before": 1.0, "after": 0.5}, extra, loss=loss)
    assert not report["decision"]["elected"] and why in report["decision"]["why"]


def test_an_op_the_step_does_not_run_is_not_timed(tmp_path):
    """On a CPU the step runs adamw=reference: triton_fused's values cannot change it, so nothing is timed."""
    assert elect.main(["--out", str(tmp_path), "--device", "cpu", "--set", "adamw=triton_fused",
                       "--values", '{"block": 512}']) == 0
    report = json.loads((tmp_path / "election.json").read_text())
    assert report["timings"] == [] and "nothing to elect" in report["decision"]["why"]


@pytest.mark.parametrize("extra, message", [
    (["--set", "adamw=triton_fused", "--values", '{"block": 500}'], "outside the declared domain"),
    (["--set", "adamw=nope"], "unknown implementation 'nope'"),
    (["--set", "rmsnorm=triton_fused"], "unknown op"),
])
def test_undeclared_names_and_values_are_refused_before_any_timing(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        elect.main(["--out", str(tmp_path), "--device", "cpu", *extra])
    assert not (tmp_path / "election.json").exists()


def test_the_candidate_starts_from_the_engines_compile_cache_and_leaves_none(tmp_path, monkeypatch):
    """The gates' compile cache is per engine location: the copy gets the engine's (content-keyed entries, so only
    what the candidate changes compiles), and elect removes the copy's cache with the copy."""
    from gates.launch import discover_engine, engine_cache_dir

    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))
    base = engine_cache_dir(discover_engine(ENGINE))
    (base / "inductor").mkdir(parents=True)
    (base / "inductor" / "entry").write_text("compiled")
    seen: dict[str, str] = {}

    def fake_time(engine, a):
        cache = engine_cache_dir(discover_engine(engine))
        seen[str(engine)] = (cache / "inductor" / "entry").read_text()
        return {"verdict": "passed", "message": "", "numbers": {"step_time_s": 1.0}, "gate_s": 0.0}

    monkeypatch.setattr(elect, "time_step", fake_time)
    monkeypatch.setattr(elect, "idle_ops", lambda engine, ops, device: [])
    out = tmp_path / "out"
    assert elect.main(["--out", str(out), "--device", "cpu", "--set", "adamw=triton_fused", "--values",
                       '{"num_warps": 8}']) == 0
    after = out / "candidate" / ENGINE.name
    assert seen == {str(ENGINE.resolve()): "compiled", str(after): "compiled"}
    caches = sorted(p.name for p in (tmp_path / "cache" / "engine-cache").iterdir())
    assert caches == [base.name]  # the candidate's went with it; the engine's stays
