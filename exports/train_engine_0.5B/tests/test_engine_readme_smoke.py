"""The README's CPU smoke run, as written there, learns (the run config's other tests are the core's:
core_train_engine_0_5b/test_run_config.py)."""

from __future__ import annotations

import shlex

import pytest
from engine_testlib import ENGINE, read_jsonl


@pytest.mark.slow
def test_the_readme_smoke_run_learns(cli, tmp_path):
    readme = (ENGINE / "README.md").read_text()
    block = readme[readme.index("# CPU smoke run"):]
    command = block[block.index("\n") + 1 : block.index("```")].replace("\\\n", " ")
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "train_engine_0_5b"] and "--num-steps" in args
    res = cli([*args[3:], "--log-file", tmp_path / "log.jsonl"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "warning" not in res.stderr
    losses = [r["loss"] for r in read_jsonl(tmp_path / "log.jsonl")]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses  # visibly learning, not warming up
