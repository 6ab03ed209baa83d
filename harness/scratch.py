"""A scratch git repository holding a copy of an engine folder as it is on disk (committed or not): where the
demo and `forge --dry-run` forge, so nothing lands on the user's branch or in the user's .git."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import launcher

IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "runs", "forge", ".git")


def git(cwd: Path, *args: str) -> str:
    """git in the scratch repository; LaunchFailed when it fails."""
    return launcher.run(["git", "-c", "user.name=forge-scratch", "-c", "user.email=scratch@localhost", *args],
                        cwd=cwd).check().stdout.strip()


def scratch_copy(source: Path, parent: Path, message: str) -> Path:
    """`parent/<source name>`: a new git repository (branch main) whose one commit is a copy of `source`."""
    eng = parent / source.name
    shutil.copytree(source, eng, ignore=IGNORE)
    (eng / ".gitignore").write_text("__pycache__/\n*.egg-info/\n")
    git(eng, "init", "-q", "-b", "main")
    git(eng, "add", "-A")
    git(eng, "commit", "-q", "-m", message)
    return eng
