"""gate_stage.py's lanes: gates split by '/' run as child processes at once, their summaries merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu import gate_stage


def test_a_lane_gets_the_parents_words_with_its_own_gates_and_folder() -> None:
    argv = ["--engine", "E", "--gates", "m1,m2/m6", "--out=/o", "--seq-length", "2048", "--m5-parts", "loss"]
    assert gate_stage.lane_argv(argv, "m6", Path("/o/lane1")) == [
        "--engine", "E", "--seq-length", "2048", "--m5-parts", "loss", "--gates", "m6", "--out", "/o/lane1"]


def test_merged_summary_keeps_every_lanes_lines_and_names_the_gates_a_lane_never_reported(tmp_path: Path) -> None:
    (tmp_path / "lane0").mkdir()
    (tmp_path / "lane0" / "summary.jsonl").write_text(
        json.dumps({"gate": "m1_forward", "verdict": "passed", "wall_s": 70.0}) + "\n")
    (tmp_path / "lane1").mkdir()  # killed before its first report
    lines = gate_stage.merge_lanes(["m1,m2", "m8"], tmp_path, [-15, -15])
    assert [(x["gate"], x["verdict"], x["lane"]) for x in lines] == [
        ("m1_forward", "passed", 0), ("m2", "error", 0), ("m8", "error", 1)]
    assert "before these gates reported" in lines[1]["message"]
    on_disk = [json.loads(x) for x in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert on_disk == lines


@pytest.mark.parametrize("parts", ["both", "mfu"])
def test_m5s_speed_part_never_shares_the_gpu_with_a_lane(tmp_path: Path, parts: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gate_stage.main(["--engine", "E", "--gates", "m1/m5", "--out", str(tmp_path), "--m5-parts", parts])
    assert "run it alone" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_the_disk_note_counts_lanes_with_training_gates_and_warns_when_short() -> None:
    assert "WARNING" not in gate_stage.disk_note(["m1,m2", "m6,m7", "m8"], 60.0)
    note = gate_stage.disk_note(["m1,m2", "m6,m7", "m8"], 38.0)
    assert "2 lane(s)" in note and "~50 GB" in note and "WARNING" in note
