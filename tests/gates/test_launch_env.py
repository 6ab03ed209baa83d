"""Stacks launched by a gate never see credentials or the gate's import path."""

import sys

from gates.launch import Deadline, run_process


def test_secrets_and_pythonpath_are_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("HF_TOKEN", "hf-test")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("FORGE_VISIBLE", "yes")
    code = "import os; print(sorted(k for k in os.environ if k in ('ANTHROPIC_API_KEY','HF_TOKEN','PYTHONPATH','FORGE_VISIBLE','GIVEN')))"
    proc = run_process([sys.executable, "-c", code], tmp_path, {"GIVEN": "1"}, Deadline(60))
    assert proc.rc == 0
    assert proc.stdout.strip() == "['FORGE_VISIBLE', 'GIVEN']"
