"""The demo's console: one line per round as its ledger line lands, an accepted unsupported part said, a failing
round's gate and numbers on its line (the loop's own output goes to a file)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from gates.report import GateReport, Part
from harness.demo import RoundTicker


def _round(stage: str, n: int, verdict: str, gates: list[dict]) -> str:
    return json.dumps({"kind": "round", "run_id": "r", "stage": stage, "round": n, "backend": "replay",
                       "verdict": verdict, "wall_s": 20.4, "gates": gates})


def test_ticker_says_each_round_once_and_honestly(tmp_path: Path) -> None:
    report = tmp_path / "m5.json"
    report.write_text(GateReport(gate="m5_long_train", verdict="unsupported", parts=[
        Part(name="loss", verdict="passed"), Part(name="mfu", verdict="unsupported", message="GPU only")]).model_dump_json())
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(_round("m1", 1, "failed", [{"name": "m1_forward", "verdict": "failed",
                                                  "metrics": {"worst_tensor": "logits", "worst_rel": 0.0175}}]) + "\n")
    out = io.StringIO()
    console = Console(file=out, width=200)
    with RoundTicker(ledger, console, every_s=0.05) as ticker:
        with ledger.open("a") as fh:
            fh.write(_round("m5", 1, "passed", [{"name": "m5_long_train", "verdict": "unsupported",
                                                 "report": str(report)}]) + "\n")
        ticker._emit()
    assert out.getvalue().splitlines() == [
        "  m1 round 1: failed (m1_forward failed: worst_tensor=logits, worst_rel=0.0175) [20 s]",
        "  m5 round 1: passed (m5_long_train mfu unsupported) [20 s]"]


def test_a_stage_passed_over_an_unsupported_part_says_so(tmp_path: Path) -> None:
    from harness.gating import stage_labels

    report = tmp_path / "m5.json"
    report.write_text(GateReport(gate="m5_long_train", verdict="unsupported", parts=[
        Part(name="mfu", verdict="unsupported", message="GPU only")]).model_dump_json())
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("\n".join([
        _round("m1", 1, "passed", [{"name": "m1_forward", "verdict": "passed"}]),
        _round("m5", 1, "passed", [{"name": "m5_long_train", "verdict": "unsupported", "report": str(report)}])]) + "\n")
    assert stage_labels({"m1": "passed", "m5": "passed", "m6": "budget"}, ledger) == {
        "m1": "passed", "m5": "passed (m5_long_train mfu unsupported)", "m6": "budget"}
