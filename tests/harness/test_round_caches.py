"""A round's worktree takes its engine's compile caches with it: the gates keep one cache per engine location, and a
round's location is never used again (on a GPU each is hundreds of MB, one per round)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gates.launch import Engine, engine_cache_dir
from harness.workspace import Workspace


def test_removing_a_round_removes_its_engines_caches_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    (repo / "exports" / "eng").mkdir(parents=True)
    (repo / "exports" / "eng" / "README.md").write_text("engine\n")
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    ws = Workspace(repo / "exports" / "eng", "forge/test", tmp_path / "state" / "worktrees")
    rounds = [ws.create_round(f"op-r0{i}") for i in (1, 2)]
    caches = [engine_cache_dir(Engine(rt.engine_dir, "eng_pkg")) for rt in rounds]
    own = engine_cache_dir(Engine(repo / "exports" / "eng", "eng_pkg"))
    for d in (*caches, own):
        (d / "triton").mkdir(parents=True)
        (d / "triton" / "kernel.bin").write_bytes(b"\x00" * 64)
    ws.remove_round(rounds[0].path)
    assert not caches[0].exists() and not rounds[0].path.exists()
    assert (caches[1] / "triton" / "kernel.bin").is_file() and (own / "triton" / "kernel.bin").is_file()
    assert ws.cleanup_stale() == ["op-r02"] and not caches[1].exists() and own.exists()
