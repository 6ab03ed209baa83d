"""`python -m benchmarks results-archive`: a superseded result that nothing cites moves under results/archive/ with
its index entry (and the `superseded_by` that name it); a cited one, or one whose notes cite a result that stays,
stays; the index still checks afterwards. Runs in a scratch git repository."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.archive import archive, plan
from benchmarks.results_index import add_entry, describe, load, problems, write_readme


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


def _result(root: Path, name: str, notes: str = "") -> None:
    (root / name).mkdir(parents=True)
    (root / name / "result.json").write_text(json.dumps({"git_commit": "abcdef1"}))
    if notes:
        (root / name / "NOTES.md").write_text(notes)


def test_archive_moves_only_what_nothing_that_stays_cites(tmp_path: Path, capsys) -> None:
    root = tmp_path / "benchmarks/results"
    root.mkdir(parents=True)
    (root / "index.jsonl").write_text("")
    write_readme(root)
    olds = {"engine-old-2026-01-01-h100": "", "engine-cited-2026-01-02-h100": "",
            "engine-pinned-2026-01-03-h100": "compare with `../engine-cited-2026-01-02-h100/`",
            "engine-pair-2026-01-04-h100": "gates: `../gates/2026-01-04-h100-pair-gates/`"}
    for name, notes in olds.items():
        _result(root, name, notes)
        add_entry(describe([name], kind="engine-experiment", what=name, root=root), root=root)
    _result(root, "gates/2026-01-04-h100-pair-gates")
    add_entry(describe(["gates/2026-01-04-h100-pair-gates"], kind="gates", what="gates", root=root), root=root)
    _result(root, "engine-new-2026-01-05-h100")
    add_entry(describe(["engine-new-2026-01-05-h100"], kind="engine-experiment", what="new", root=root),
              supersedes=(*olds, "gates/2026-01-04-h100-pair-gates"), root=root)
    (tmp_path / "README.md").write_text("see benchmarks/results/engine-cited-2026-01-02-h100/\n")
    (tmp_path / "docs.md").write_text("engine-old-2026-01-01-h100-extra is another name, not a citation\n")
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "results")

    decided = {d.entry.id: d.kept_by for d in plan(root)}
    assert decided == {"engine-old-2026-01-01-h100": [], "engine-pair-2026-01-04-h100": [],
                       "gates/2026-01-04-h100-pair-gates": [],
                       "engine-cited-2026-01-02-h100": ["cited by README.md"],
                       "engine-pinned-2026-01-03-h100": ["cites engine-cited-2026-01-02-h100"]}
    archive(root)
    ids = {e.id: e for e in load(root)}
    assert set(ids) == {"archive/engine-old-2026-01-01-h100", "archive/engine-pair-2026-01-04-h100",
                        "archive/gates/2026-01-04-h100-pair-gates", "engine-cited-2026-01-02-h100",
                        "engine-pinned-2026-01-03-h100", "engine-new-2026-01-05-h100"}
    assert ids["archive/engine-old-2026-01-01-h100"].superseded_by == "engine-new-2026-01-05-h100"
    assert ids["archive/engine-pair-2026-01-04-h100"].paths == ["archive/engine-pair-2026-01-04-h100/NOTES.md",
                                                               "archive/engine-pair-2026-01-04-h100/result.json"]
    assert (root / "archive/gates/2026-01-04-h100-pair-gates/result.json").is_file()
    assert not (root / "engine-old-2026-01-01-h100").exists()
    assert "archive/engine-old-2026-01-01-h100/result.json" in _git(tmp_path, "diff", "--cached", "--name-only")
    assert problems(root) == []
    assert plan(root) == [d for d in plan(root) if not d.moves]  # a second run moves nothing
