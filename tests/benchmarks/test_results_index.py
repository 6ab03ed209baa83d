"""The results index: the committed index covers every result file, the README is its rendering, `check` names
what is wrong, `add` appends an entry from the files' own metadata, and no commit is ever made up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from benchmarks.results_index import (RESULTS_DIR, Entry, load, main, problems, recorded_commit, render_readme)

CURRENT_COMPARE = "2026-11-24-h100-minicpm4-0.5b-ce-split"


@pytest.fixture
def results_copy(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, root)
    return root


def test_committed_index_passes_check(capsys) -> None:
    assert problems(RESULTS_DIR) == []
    assert main(["check"]) == 0
    assert "all indexed" in capsys.readouterr().out


def test_committed_readme_is_the_rendering() -> None:
    assert (RESULTS_DIR / "README.md").read_text() == render_readme(load(RESULTS_DIR))


def test_check_names_an_unindexed_file(results_copy: Path, capsys) -> None:
    (results_copy / "engine-0.5b-ce-split-2026-11-24-h100" / "stray.json").write_text("{}")
    assert main(["--root", str(results_copy), "check"]) == 1
    err = capsys.readouterr().err
    assert "engine-0.5b-ce-split-2026-11-24-h100/stray.json belongs to no entry" in err


def test_check_names_a_missing_path(results_copy: Path, capsys) -> None:
    (results_copy / f"{CURRENT_COMPARE}.md").unlink()
    assert main(["--root", str(results_copy), "check"]) == 1
    assert f"indexed path {CURRENT_COMPARE}.md does not exist" in capsys.readouterr().err


def test_check_names_a_hand_edited_readme(results_copy: Path, capsys) -> None:
    readme = results_copy / "README.md"
    readme.write_text(readme.read_text().replace("51.3 %", "55.0 %"))
    assert main(["--root", str(results_copy), "check"]) == 1
    assert "README.md is not the rendering" in capsys.readouterr().err


def test_an_entry_without_a_recorded_commit_says_so() -> None:
    entries = {e.id: e for e in load(RESULTS_DIR)}
    first = entries["2026-11-23-h100-minicpm4-0.5b"]  # its JSON says git_commit "HEAD\nunknown"
    assert first.commit is None and first.commit_source is None
    assert first.commit_note.startswith("not recorded") and "HEAD\\nunknown" in first.commit_note
    missing = [e for e in entries.values() if e.commit is None]
    assert missing and all(e.commit_note.startswith("not recorded") for e in missing)
    # and the model refuses an entry that has neither a commit nor the note
    data = first.model_dump(mode="json") | {"commit_note": None}
    with pytest.raises(ValidationError, match="not recorded"):
        Entry.model_validate(data)


def test_a_recorded_commit_names_its_source() -> None:
    current = {e.id: e for e in load(RESULTS_DIR)}[CURRENT_COMPARE]
    assert current.commit == json.loads((RESULTS_DIR / f"{CURRENT_COMPARE}.json").read_text())["git_commit"]
    assert current.commit_source == f"{CURRENT_COMPARE}.json: git_commit"
    assert current.status == "current" and current.stacks["engine:train_engine_0.5B"].tokens_per_s == 158240.9


def test_recorded_commit_reads_env_txt_and_lists_the_others() -> None:
    run = "gates/2026-12-02-h200-pretrain-gates"
    paths = sorted(p.relative_to(RESULTS_DIR).as_posix() for p in (RESULTS_DIR / run).rglob("env.txt"))
    commit, source, note = recorded_commit(RESULTS_DIR, paths)
    assert (commit, source) == ("179d7faaa130", f"{run}/run1_fallback_ops/env.txt: commit line")
    assert "011deecab9f2" in note and "8db59a84a79a" in note


def test_add_appends_an_entry_from_the_files_and_supersedes(results_copy: Path, capsys) -> None:
    new = "2026-12-09-h200-minicpm4-0.5b-next"
    data = json.loads((results_copy / f"{CURRENT_COMPARE}.json").read_text()) | {"git_commit": "0123abc"}
    (results_copy / f"{new}.json").write_text(json.dumps(data))
    (results_copy / f"{new}.md").write_text("# table\n")
    rc = main(["--root", str(results_copy), "add", f"{new}.json", f"{new}.md", "--kind", "compare",
               "--what", "the next side-by-side run", "--supersedes", CURRENT_COMPARE])
    assert rc == 0, capsys.readouterr().err
    entries = {e.id: e for e in load(results_copy)}
    added = entries[new]
    assert (added.date.isoformat(), added.device, added.commit) == ("2026-12-09", "h200", "0123abc")
    assert added.paths == [f"{new}.json", f"{new}.md"] and added.model == "minicpm4-0.5b"
    assert entries[CURRENT_COMPARE].superseded_by == new
    assert problems(results_copy) == []  # README rewritten, every file indexed
    # a second add of the same files is refused
    assert main(["--root", str(results_copy), "add", f"{new}.json", "--kind", "compare", "--what", "x"]) == 1
    assert "already" in capsys.readouterr().err


def test_add_of_a_folder_without_a_commit_says_not_recorded(results_copy: Path) -> None:
    run = results_copy / "engine-0.5b-next-2026-12-09-cpu"
    run.mkdir()
    (run / "NOTES.md").write_text("# notes\n\ntorch 2.13.0, triton 3.6.0\n")
    assert main(["--root", str(results_copy), "add", run.name + "/", "--kind", "engine-experiment",
                 "--what", "a CPU run"]) == 0
    added = {e.id: e for e in load(results_copy)}[run.name]
    assert added.commit is None and added.commit_note == "not recorded: none of its files records a commit"
    assert added.versions == {"torch": "2.13.0", "triton": "3.6.0"} and added.paths == [f"{run.name}/NOTES.md"]


def test_the_gate_clock_figures_come_from_the_reports_and_fill_the_repository_readme(tmp_path: Path, capsys) -> None:
    """M5's speed part in a gate report becomes index metrics (verdict, tokens/s, MFU, batch) and a row of the
    repository README's generated table; a hand edit of that table fails `check`, `readme` restores it."""
    from benchmarks.results_index import begin_marker, end_marker, gate_clock_rows

    root = tmp_path / "benchmarks" / "results"
    shutil.copytree(RESULTS_DIR, root)
    top = tmp_path / "README.md"
    top.write_text(f"# x\n\n{begin_marker('gate-clock')}\nstale\n{end_marker('gate-clock')}\nmid\n"
                   f"{begin_marker('compare')}\n{end_marker('compare')}\nafter\n")
    assert main(["--root", str(root), "check"]) == 1  # the stale table
    assert "generated tables are not the index's" in capsys.readouterr().err
    assert main(["--root", str(root), "readme"]) == 0 and main(["--root", str(root), "check"]) == 0
    entry = {e.id: e for e in load(root)}["gates/2026-12-03-h200-m5-verdict"]
    [row] = gate_clock_rows(entry)
    assert row == {"report": "call2_gb64/m5_long_train", "verdict": "passed", "tokens_per_s": pytest.approx(154684.6, abs=0.1),
                   "mfu": pytest.approx(0.501376, abs=1e-6), "global_batch_size": 64, "seq_length": 4096,
                   "clock": "walls 2N-N"}
    text = top.read_text()
    assert "| passed | walls 2N-N | 154,685 | 50.1 % | 64 x 4096 |" in text and text.endswith(f"{end_marker('compare')}\nafter\n")
    assert "| 163,723 (53.1 %, micro batch 8) | 0.945 |" in text  # the same result's bench beside the gate's figure
    # a result of two calls: each row beside its own call's bench (its folder), not the other call's
    assert "| log lines | 157,170 | 50.9 % | 64 x 4096 | 157,355 (51.0 %, micro batch 8) | 0.999 |" in text
    assert "| log lines | 156,747 | 50.8 % | 8 x 4096 | 158,430 (51.4 %, micro batch 8) | 0.989 |" in text
    assert "| train_engine_0.5B | 8 | 158,241 | 51.3 % | 31.1 |" in text  # the current comparison's rows
    assert "train_engine_0.5B / torch-compile = 1.294x" in text and f"{end_marker('gate-clock')}\nmid\n" in text
    top.write_text(text.replace("154,685", "164,685"))
    assert main(["--root", str(root), "check"]) == 1


def test_refresh_rereads_the_figures_and_changes_nothing_on_the_committed_index(results_copy: Path) -> None:
    from benchmarks.results_index import refresh

    before = (results_copy / "index.jsonl").read_text()
    assert refresh(results_copy) == [] and (results_copy / "index.jsonl").read_text() == before
