"""The ledger: typed records in and out (rounds and each event's own fields), a torn line skipped, an event this
version does not know kept with its fields, the query methods the loop resumes from, the committed copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from harness.ledger import Event, Ledger, OpBaseline, OpDone, RoundRecord, RunStopped, parse


def _round(stage: str, n: int, **kw) -> RoundRecord:  # noqa: ANN003
    return RoundRecord(run_id="r", stage=stage, round=n, backend="replay", verdict=kw.pop("verdict", "failed"), **kw)


def test_events_are_typed_and_validated(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.event("r", "run_stopped", stage="m1", status="budget", message="spent")
    with pytest.raises(ValidationError):
        ledger.event("r", "op_done", stage="ops", op="mlp", best="fast")  # a number or None
    with pytest.raises(KeyError):
        ledger.event("r", "no_such_event")
    (stopped,) = ledger.events(RunStopped)
    assert (stopped.stage, stopped.status, stopped.message) == ("m1", "budget", "spent")
    assert ledger.records()[-1]["event"] == "run_stopped" and len(ledger.records()) == 1


def test_queries_skip_torn_lines_and_keep_unknown_events(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(_round("m1", 1))
    ledger.append(_round("ops", 1, op="mlp", verdict="passed", timing=0.5, elected=True))
    ledger.event("r", "op_baseline", key="ops-mlp", op="mlp", value=0.9, note="baseline")
    ledger.event("r", "op_baseline", key="ops-mlp", op="mlp", value=0.7, note="a second one is not the first")
    ledger.event("r", "op_done", stage="ops", op="mlp", best=0.5, best_round=1)
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "event", "run_id": "r", "event": "later_version", "extra": 3}) + "\n{torn")
    ledger.append(_round("m1", 2, verdict="passed"))  # after a torn line: still its own line
    assert [(r.key, r.round) for r in ledger.rounds()] == [("m1", 1), ("ops-mlp", 1), ("m1", 2)]
    assert [r.round for r in ledger.rounds("m1")] == [1, 2]
    assert ledger.op_baseline("ops-mlp").value == 0.9 and ledger.op_baseline("ops-attention") is None
    assert ledger.ops_done("ops") == {"mlp"} and ledger.ops_done("m1") == set()
    (done,) = ledger.events(OpDone)
    assert (done.best, done.best_round) == (0.5, 1)
    unknown = [e for e in ledger.typed() if isinstance(e, Event) and e.event == "later_version"]
    assert len(unknown) == 1 and unknown[0].model_dump()["extra"] == 3
    assert ledger.totals()["rounds"] == 3
    assert isinstance(parse({"kind": "event", "run_id": "r", "event": "op_baseline", "key": "k", "op": "o"}), OpBaseline)
    assert parse({"kind": "round", "stage": "m1"}) is None  # no run id, round, backend, verdict: not a round


def test_the_committed_copy_is_the_ledger_plus_the_round(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.event("r", "run_started", spec="s", spec_sha256="0" * 64, branch="forge/s", base="abc", engine="/e")
    rec = _round("m1", 1, verdict="passed", commit="c0ffee")
    lines = ledger.copy_with(rec).decode().splitlines()
    assert json.loads(lines[0])["event"] == "run_started" and RoundRecord.model_validate_json(lines[1]) == rec
    assert len(ledger.records()) == 1  # the copy does not append
