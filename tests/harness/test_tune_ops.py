"""benchmarks/gpu/tune_ops.py, the GPU session's tune part, on the CPU (tiny preset, fp32, Triton's interpreter):
the tune search per op through the per-op harness, each op's leaderboard, the summary and the tuned values written;
an unknown op is a row of its own, the others still run; no trial starts outside its time window."""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.gpu import tune_ops
from gates.ops.harness import describe
from harness.agents.tune import TuneOptions, Window, tune_op

ENGINE = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B"


def test_the_tune_part_writes_leaderboards_summary_and_tuned_values(tmp_path):
    out = tmp_path / "out"
    rc = tune_ops.main(["--out", str(out), "--device", "cpu", "--ops", "rms_norm,rmsnorm,swiglu", "--max-trials", "2",
                        "--seq", "8", "--reps", "2", "--budget-s", "240"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"]["device"] == "cpu" and summary["preset"] == "tiny" and summary["dtype"] == "float32"
    rows = {r["op"]: r for r in summary["ops"]}
    assert list(rows) == ["rms_norm", "rmsnorm", "swiglu"]
    assert rows["rmsnorm"]["status"].startswith("error: unknown op 'rmsnorm'")
    for op, default in (("rms_norm", {"num_warps": None}), ("swiglu", {"block": 1024, "num_warps": 4})):
        r = rows[op]
        assert (r["impl"], r["status"], r["trials"], r["failed"], r["errors"]) == ("triton_fused", "done", 2, 0, 0)
        assert r["on_default_path"] is False  # the CPU's default step runs the reference math
        assert r["default"] == default  # the declared defaults, tried first
        assert r["winner_ms"] <= r["default_ms"] and r["speedup"] >= 1.0 and r["gbps"] > 0
        board = json.loads((out / "forge/leaderboards" / f"{op}.json").read_text())
        assert len(board["entries"]) == 2 and {e["verdict"] for e in board["entries"]} == {"passed"}
        assert board["hardware"]["device"] == "cpu" and board["versions"]["torch"]
        assert board["best"]["values"] == r["winner"]
        assert all(len(e["shapes"]) == 3 and e["timing"]["clock"] == "perf_counter" for e in board["entries"])
    (entry,) = json.loads((out / "tuned/configs.json").read_text())["entries"]
    assert entry["key"] == summary["runtime"]
    assert entry["ops"] == {op: {"triton_fused": rows[op]["winner"]} for op in ("rms_norm", "swiglu")}
    table = (out / "summary.md").read_text()
    assert "| op | impl | on the default step | winner | ms |" in table and "| swiglu | triton_fused | no |" in table


def test_the_default_ops_are_the_default_steps_tunable_ones():
    """Without --ops: the (op, impl) pairs `auto` resolves to on the device with a declared space, never an
    implementation the step does not run (rms_norm's Triton kernel: the CUDA step runs it as compiled reference math)."""
    engine_ops = describe(ENGINE)
    pairs = tune_ops.default_path(engine_ops, "cuda")
    names = engine_ops.resolved["cuda"]["names"]
    assert pairs and ("adamw", "triton_fused") in pairs and ("qkv_rope", "triton_fused") in pairs
    assert all(names[op] == impl and engine_ops.space(op, impl) for op, impl in pairs)
    assert names["rms_norm"] == "reference" and "rms_norm" not in dict(pairs)
    assert tune_ops.default_path(engine_ops, "cpu") == []  # all reference math: nothing to tune


def test_no_trial_starts_after_its_window():
    def never(*_):
        raise AssertionError("a trial ran outside its window")

    now = time.monotonic()
    trials = tune_op(ENGINE, "swiglu", "triton_fused", {"block": [512, 1024]}, TuneOptions(), preset="tiny",
                     engine_ops=describe(ENGINE), runner=never, baseline={"block": 1024},
                     window=Window(last_start=now, end=now + 60))
    assert trials == []
