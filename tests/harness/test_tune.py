"""The `tune` backend and an ops stage on a copy of the real 0.5B engine (CPU, Triton's interpreter).

tune searches the space the engine declares (swiglu=triton_fused's block) with the per-op harness: a fast but wrong
candidate (block 256 made to skip columns in this copy) is rejected, the correct best is written to the engine's
tuned-config file under this runtime's key, every trial lands in the op's leaderboard. The loop elects a round
only when the whole step is faster on its step clock (a fake here, one that asks the candidate's engine what it
resolves) by more than the margin, and the elected value is what the engine's op launches with afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from forge_toy import git, make_task, write_spec_file

from gates.ops.harness import leaderboard_path
from harness.agents import get_backend
from harness.agents.tune import TuneBackend, write_tuned
from harness.gating import GateOutcome
from harness.ledger import Ledger
from harness.loop import ELECTION_MARGIN, ForgeError, ForgeLoop
from harness.spec import parse_spec

ENGINE = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B"
REL = "exports/train_engine_0.5B"
TUNED = "src/train_engine_0_5b/tuned/configs.json"
BROKEN_256 = ("    n_col_blocks = triton.cdiv(f, block)\n",
              "    n_col_blocks = f // block if block == 256 else triton.cdiv(f, block)  # broken on purpose\n")
CPU_DEFAULT = ('            "num_warps": Param(4, (1, 2, 4, 8))}))),\n',  # swiglu=triton_fused is what auto runs on a CPU
               '            "num_warps": Param(4, (1, 2, 4, 8))})), defaults={"cpu": ("triton_fused",)}),\n')
HARNESS = {"device": "cpu", "seq": 8, "reps": 2, "warmup": 1, "timeout_s": 300}
# what the engine in `sys.argv[1]` resolves for swiglu=triton_fused, and the block its kernel launch gets
ENGINE_VIEW = textwrap.dedent('''
    import json, sys
    import torch
    from train_engine_0_5b.ops.registry import OpSelection, resolve
    from train_engine_0_5b.ops.swiglu import triton_fused
    ops = resolve(OpSelection(swiglu="triton_fused"), "cpu")
    launched = []
    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **meta: launched.append(meta["BLOCK"])
    triton_fused._swiglu_fwd_kernel = Spy()
    triton_fused.swiglu_fwd(torch.randn(2, 300), torch.randn(2, 300))
    print(json.dumps({"tuned": ops.tuned, "launched": launched}))
''')


def engine_view(engine_dir: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", ENGINE_VIEW], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(engine_dir / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A git workspace holding a copy of the engine whose swiglu block 256 is fast and wrong, and whose CPU default
    is swiglu=triton_fused (so the step runs what tune tunes)."""
    ws = tmp_path_factory.mktemp("ws")
    eng = ws / REL
    shutil.copytree(ENGINE, eng, ignore=shutil.ignore_patterns("__pycache__", "tests", "scripts", "forge"))
    for rel, change in (("ops/swiglu/triton_fused.py", BROKEN_256), ("ops/table.py", CPU_DEFAULT)):
        path = eng / "src/train_engine_0_5b" / rel
        assert path.read_text().count(change[0]) == 1, rel
        path.write_text(path.read_text().replace(*change))
    (ws / ".gitignore").write_text("__pycache__/\n")
    git(ws, "init", "-q", "-b", "main")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "workspace with the engine")
    return ws


def _task(tmp_path: Path, ws: Path, op: str = "swiglu"):
    wt = tmp_path / "wt"
    shutil.copytree(ws, wt, ignore=shutil.ignore_patterns(".git"))
    return make_task(tmp_path, wt, engine_dir=wt / REL, stage="ops", op=op, log_dir=tmp_path / "log",
                     sandboxed=False, extra={"package": "train_engine_0_5b", "preset": "tiny", "device": "cpu"})


def test_tune_searches_the_declared_space_and_rejects_fast_but_wrong(tmp_path, workspace):
    task = _task(tmp_path, workspace)
    res = get_backend("tune", {"impl": "triton_fused", "space": {"block": [256, 512]}, "harness": HARNESS}).run(task)
    assert res.error is None and res.turns == 2 and "1 rejected by the per-op harness" in res.summary, res
    tuned = json.loads((task.engine_dir / TUNED).read_text())
    (entry,) = tuned["entries"]
    assert entry["ops"] == {"swiglu": {"triton_fused": {"block": 512}}} and entry["key"]["device"] == "cpu"
    assert engine_view(task.engine_dir)["tuned"]["swiglu=triton_fused"]["block"] == 512
    assert not leaderboard_path(task.engine_dir, "swiglu").exists()  # the loop writes leaderboards, never a backend
    trials = json.loads((tmp_path / "log/op_trials.json").read_text())["trials"]
    assert sorted((t["values"]["block"], t["verdict"]) for t in trials) == [(256, "failed"), (512, "passed")]


@pytest.mark.parametrize("op, options, message", [
    ("rmsnorm", {}, "unknown op 'rmsnorm'"),
    ("swiglu", {"impl": "cutlass"}, "unknown implementation 'cutlass'"),
    ("swiglu", {"impl": "triton_fused", "space": {"block_size": [64]}}, "unknown parameter 'block_size'"),
    ("swiglu", {"impl": "triton_fused", "space": {"block": [100]}}, "block=100 is outside the declared domain"),
    ("gemm", {}, "no registered implementation declares a tunable space"),
])  # fmt: skip
def test_tune_refuses_unknown_names(tmp_path, workspace, op, options, message):
    task = _task(tmp_path, workspace, op)
    res = get_backend("tune", options | {"harness": HARNESS}).run(task)
    assert res.error is not None and message in res.error and res.turns is None
    assert not (task.engine_dir / TUNED).read_text().count("swiglu")  # nothing written


def test_grid_then_random_points_then_coordinate_descent():
    """The search alone, on a fake score: the full grid when it fits; otherwise random points, then one parameter
    at a time from the best, within max_trials; a wrong candidate (inf) is never the best."""
    space = {"a": [1, 2, 3, 4], "b": [10, 20, 30], "c": [True, False]}
    calls: list[dict] = []

    def score(p: dict) -> float:
        calls.append(p)
        return float("inf") if p["a"] == 1 else abs(p["a"] - 3) + abs(p["b"] - 20) / 10 + (0 if p["c"] else 0.5)

    grid = TuneBackend({"max_trials": 24})._search(space, score, lambda: len(calls))
    assert grid == {"a": 3, "b": 20, "c": True} and len(calls) == 24
    calls.clear()
    seen: list[dict] = []
    unique = lambda: len({json.dumps(p, sort_keys=True) for p in seen})  # noqa: E731

    def counted(p: dict) -> float:
        seen.append(p)
        return score(p)

    best = TuneBackend({"max_trials": 12, "random_trials": 3, "seed": 1})._search(space, counted, unique)
    assert best == {"a": 3, "b": 20, "c": True} and unique() <= 12 + 1


def test_write_tuned_keeps_other_runtimes_and_ops(tmp_path):
    path = tmp_path / "configs.json"
    key_a, key_b = {"device": "cpu", "torch": "1", "triton": None, "cuda": None}, {"device": "H200", "torch": "1",
                                                                                   "triton": "3", "cuda": "12"}
    write_tuned(path, key_a, "swiglu", "triton_fused", {"block": 512})
    write_tuned(path, key_b, "adamw", "triton_fused", {"block": 2048})
    write_tuned(path, key_a, "swiglu", "triton_fused", {"num_warps": 8})
    entries = json.loads(path.read_text())["entries"]
    assert [e["ops"] for e in entries] == [{"swiglu": {"triton_fused": {"block": 512, "num_warps": 8}}},
                                           {"adamw": {"triton_fused": {"block": 2048}}}]


def _passing_gate(gate, engine_dir, spec, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    return GateOutcome(gate.name, "passed", {"max_rel_err": 0.0}, None, 0.0, None)


def _spec(workspace: Path, rounds: int = 2, **stage):
    return parse_spec({
        "name": "tune-cpu", "model": {"preset": "tiny"},
        "engine": {"path": str(workspace / REL), "package": "train_engine_0_5b",
                   "allowed_paths": ["src/**"]},
        "budgets": {"rounds_per_stage": rounds}, "loop": {"land": True, "regression": False},
        "agent": {"backend": "tune", "sandbox": "preferred", "timeout_s": 600},
        "stages": [{"name": "ops", "kind": "ops", "ops": ["swiglu"], "gates": [{"name": "m1_forward"}],
                    "timing": {"metric": "step_time_s"},
                    "agent": {"backend": "tune", "sandbox": "preferred", "timeout_s": 600,
                              "options": {"impl": "triton_fused", "space": {"block": [256, 512]}, "harness": HARNESS}},
                    **stage}]})


@pytest.mark.slow  # a whole forge loop on a copy of the real engine: 20-60 s
def test_an_ops_stage_elects_only_a_faster_step_and_the_engine_runs_the_elected_value(tmp_path, workspace):
    """Step clock: 1 ms per 1024 of swiglu's block, as the candidate's engine resolves it (512 beats the default
    1024). Round 1 elects 512 (256 was faster per op but wrong); round 2 finds 512 again: not faster, not elected."""
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)  # this test lands its election: a workspace of its own
    seen: list[dict] = []

    def step_clock(engine_dir, timing, spec):
        view = engine_view(engine_dir)
        seen.append(view)
        block = view["tuned"]["swiglu=triton_fused"]["block"]
        return block / 1024 * 1e-3, f"step_time_s={block / 1024e3:.6g} (fake)"

    state = tmp_path / "state"
    loop = ForgeLoop(_spec(ws), write_spec_file(tmp_path / "spec.toml"), engine=ws / REL,
                     state_dir=state, gate_fn=_passing_gate, step_clock=step_clock, guard=[])
    out = loop.run()
    assert out.ok, out.message
    ops = [r for r in Ledger(state / "ledger.jsonl").rounds() if r.stage == "ops"]
    assert [(r.round, r.verdict, r.elected, r.timing) for r in ops] == [(1, "passed", True, 0.5e-3),
                                                                       (2, "failed", False, 0.5e-3)]
    assert ops[1].note == "not faster on the gates' clock"
    assert [v["launched"] for v in seen] == [[1024], [512], [512]]  # baseline, round 1, round 2: what the op ran
    landed = ws / REL
    assert engine_view(landed) == {"tuned": {"swiglu=triton_fused": {"block": 512, "num_warps": 4}}, "launched": [512]}
    manifest = json.loads((landed / "manifest.json").read_text())
    assert manifest["ops"]["swiglu"]["value"] == 0.5e-3 and manifest["ops"]["swiglu"]["baseline"] == 1e-3
    board = json.loads(leaderboard_path(landed, "swiglu").read_text())  # committed with the election
    rows = {(e["values"].get("block"), e["verdict"], e["source"]) for e in board["entries"]}
    assert (256, "failed", "ops-swiglu round 1 (tune)") in rows  # tune's trial, rejected by the per-op harness
    assert (512, "passed", "ops-swiglu round 1 (the round's default)") in rows  # the loop's own check of what runs
    assert board["best"]["values"]["block"] == 512 and board["hardware"]["device"] == "cpu"
    assert ELECTION_MARGIN > 0


@pytest.mark.slow  # a whole forge loop on a copy of the real engine: 20-60 s
def test_a_step_within_the_margin_is_not_elected(tmp_path, workspace):
    clock = iter([1.0, 1.0 / (1 + ELECTION_MARGIN / 2)])  # baseline, then a candidate 0.5 % faster: noise
    loop = ForgeLoop(_spec(workspace, rounds=1), write_spec_file(tmp_path / "spec.toml"), engine=workspace / REL,
                     state_dir=tmp_path / "s", gate_fn=_passing_gate, step_clock=lambda *a: (next(clock), "fake"),
                     land=False, guard=[])
    assert loop.run().ok
    (r,) = [r for r in Ledger(tmp_path / "s/ledger.jsonl").rounds() if r.stage == "ops"]
    assert r.verdict == "failed" and not r.elected


@pytest.mark.slow  # a whole forge loop on a copy of the real engine: 20-60 s
def test_every_round_of_an_op_starts_from_the_baselines_compile_cache(tmp_path, workspace, monkeypatch):
    """The gates keep a compile cache per engine location and each round is a new worktree: what the baseline
    timing compiled (before any agent ran) seeds every later round, and no round's cache outlives its worktree."""
    from gates.launch import discover_engine, engine_cache_dir

    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))
    seen: list[tuple[str, bool]] = []

    def step_clock(engine_dir, timing, spec):
        cache = engine_cache_dir(discover_engine(engine_dir))
        if not seen:  # the baseline: "compiles" into its location's cache
            (cache / "inductor").mkdir(parents=True)
            (cache / "inductor" / "graph").write_text("compiled by the baseline")
        seen.append((engine_dir.parents[1].name, (cache / "inductor" / "graph").is_file()))
        return 1.0, "fake"

    (tmp_path / "s" / "compile-cache-seed" / "ops-rms_norm" / "triton").mkdir(parents=True)  # an earlier op's seed
    loop = ForgeLoop(_spec(workspace, rounds=2), write_spec_file(tmp_path / "spec.toml"), engine=workspace / REL,
                     state_dir=tmp_path / "s", gate_fn=_passing_gate, step_clock=step_clock, land=False, guard=[])
    assert loop.run().ok
    assert seen == [("ops-swiglu-r01", True), ("ops-swiglu-r01", True), ("ops-swiglu-r02", True)]
    assert [d.name for d in (tmp_path / "s" / "compile-cache-seed").iterdir()] == ["ops-swiglu"]  # an older op's went
    assert (tmp_path / "s" / "compile-cache-seed" / "ops-swiglu" / "inductor" / "graph").is_file()
    assert not list((tmp_path / "cache" / "engine-cache").iterdir())  # the rounds' caches went with their worktrees


@pytest.mark.parametrize("stage, message", [
    ({"ops": ["rmsnorm"]}, "unknown op 'rmsnorm'; the engine's ops: "),
    ({"timing": {"command": "python bench.py {out}"}}, "[stages.timing].command is not read"),
    ({"agent": {"backend": "tune", "sandbox": "preferred", "options": {"impl": "triton_fused", "space": {"blocks": [512]}}}},
     "[stages.agent.options]: swiglu=triton_fused: unknown parameter 'blocks'"),
    ({"agent": {"backend": "tune", "sandbox": "preferred", "options": {"impl": "triton_fused", "space": {"block": [3]}}}},
     "[stages.agent.options]: swiglu=triton_fused: block=3 is outside the declared domain"),
])  # fmt: skip
def test_the_loop_refuses_unknown_ops_and_an_engine_clock(tmp_path, workspace, stage, message):
    loop = ForgeLoop(_spec(workspace, **stage), write_spec_file(tmp_path / "spec.toml"), engine=workspace / REL,
                     state_dir=tmp_path / "s", gate_fn=_passing_gate)
    with pytest.raises(ForgeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        loop.run()
    assert not (tmp_path / "s/ledger.jsonl").exists()


def test_the_gates_clock_gives_no_time_when_the_timed_steps_train_differently(monkeypatch, workspace):
    """M5's speed part failed on its loss check (a fast step that is not the reference's training): no figure,
    whatever its step time; a passing part gives its step time."""
    import gates.m5_long_train as m5
    from gates.report import Part
    from harness.timing import gate_step_clock

    spec = _spec(workspace)
    timing = spec.stages[0].timing
    fast_but_wrong = Part(name="mfu", verdict="failed", numbers={"step_time_s": 0.001},
                          message="the timed runs' losses differ from the reference's on the same data")
    monkeypatch.setattr(m5, "speed_part", lambda g, model: fast_but_wrong)
    value, note = gate_step_clock(workspace / REL, timing, spec)
    assert value is None and "losses differ" in note
    monkeypatch.setattr(m5, "speed_part", lambda g, model: Part(name="mfu", verdict="passed", message="ok",
                                                                numbers={"step_time_s": 0.25}))
    assert gate_step_clock(workspace / REL, timing, spec) == (0.25, "step_time_s=0.25 on the gates' clock")


@pytest.mark.slow  # a whole forge loop on a copy of the real engine: 20-60 s
def test_no_election_without_a_baseline(tmp_path, workspace):
    clock = iter([None, 0.5])  # the baseline could not be timed; the candidate could
    loop = ForgeLoop(_spec(workspace, rounds=1), write_spec_file(tmp_path / "spec.toml"), engine=workspace / REL,
                     state_dir=tmp_path / "s", gate_fn=_passing_gate, land=False, guard=[],
                     step_clock=lambda *a: (next(clock), "fake"))
    assert loop.run().ok
    (r,) = [r for r in Ledger(tmp_path / "s/ledger.jsonl").rounds() if r.stage == "ops"]
    assert not r.elected and r.timing == 0.5 and "baseline has no time" in r.note


@pytest.mark.slow  # a whole forge loop on a copy of the real engine: 20-60 s
def test_a_tune_round_whose_implementation_the_step_does_not_run_is_not_elected(tmp_path, workspace):
    """The real engine on a CPU runs swiglu's reference: tuning triton_fused cannot change the step, so the round is
    not timed or elected (the clock's noise would decide it)."""
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    table = ws / REL / "src/train_engine_0_5b/ops/table.py"
    table.write_text(table.read_text().replace(CPU_DEFAULT[1], CPU_DEFAULT[0]))
    git(ws, "commit", "-qam", "the engine's own CPU default")
    times = iter([1.0, 0.5])
    loop = ForgeLoop(_spec(ws, rounds=1), write_spec_file(tmp_path / "spec.toml"), engine=ws / REL,
                     state_dir=tmp_path / "s", gate_fn=_passing_gate, land=False, guard=[],
                     step_clock=lambda *a: (next(times), "fake"))
    assert loop.run().ok
    (r,) = [r for r in Ledger(tmp_path / "s/ledger.jsonl").rounds() if r.stage == "ops"]
    assert not r.elected and r.timing is None
    assert r.note == "swiglu=triton_fused does not run in the step on cpu (auto runs reference): nothing to elect"
