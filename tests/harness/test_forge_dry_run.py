"""`forge --dry-run` forges a scratch copy of the engine as it is on disk: the round runs and its pass is committed
there, and the user's repository is left as it was (no commit, no branch, no .git/forge state, no file changed).
A plain `forge` on the same spec does land (the contrast that makes the first check mean something)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import harness.loop
from forge_toy import FIXED, fake_gate, git, make_repo, toy_spec, write_toml_spec
from harness.cli import app


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    monkeypatch.setattr(harness.loop, "run_real_gate", fake_gate)  # the toy engine's gate, not the workspace's
    eng = make_repo(tmp_path / "ws", FIXED)
    (eng / "README.md").write_text("toy engine, edited and not committed\n")
    spec = write_toml_spec(tmp_path / "toy.toml", toy_spec(eng, stages=("m1",), loop={"land": True}))
    return tmp_path / "ws", eng, spec


def _state(root: Path) -> tuple[str, str, str]:
    return git(root, "rev-parse", "HEAD"), git(root, "branch", "--list"), git(root, "status", "--porcelain")


def test_dry_run_lands_nothing(repo: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, eng, spec = repo
    runs = tmp_path / "runs"
    monkeypatch.setattr("harness.commands.forge.runs_dir", lambda: runs)
    before = _state(root)
    r = CliRunner().invoke(app, ["forge", "--spec", str(spec), "--dry-run"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert _state(root) == before and not (root / ".git" / "forge").exists()
    assert "nothing landed in your repository" in r.output
    (copy,) = runs.glob("forge-dry-run-*/toy_engine")
    assert (copy / "README.md").read_text() == "toy engine, edited and not committed\n"  # the engine as it is on disk
    assert "forge(m1): manifest.json" in git(copy, "log", "--format=%s")  # the pass, committed in the copy
    assert json.loads((copy / "manifest.json").read_text())["gates"]["m1_forward"]["verdict"] == "passed"

    r = CliRunner().invoke(app, ["forge", "--spec", str(spec)], terminal_width=200)  # not a dry run: it lands
    assert r.exit_code == 0, r.output
    assert "forge(m1): manifest.json" in git(root, "log", "--format=%s", "main")
    assert (root / ".git" / "forge" / "toy" / "run.json").is_file()  # its state in the engine's repository, not ours


def test_dry_run_refuses_resume(repo: tuple[Path, Path, Path]) -> None:
    _, _, spec = repo
    r = CliRunner().invoke(app, ["forge", "--spec", str(spec), "--dry-run", "--resume"])
    assert r.exit_code == 2 and "--dry-run starts a fresh run" in r.output
