"""scripts/gpu_check.sh, the engine's GPU check, end to end on the CPU at a tiny size without its pytest step: every
step exits 0, the HF export reproduces the engine's logits and the summary holds what the GPU run quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from engine_testlib import ENGINE


@pytest.mark.slow
def test_the_gpu_check_runs_whole_on_a_cpu(tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CKPT": str(tmp_path / "ckpt"), "MODEL": "tiny", "STEPS": "3",
           "SEQ": "64", "MB": "2", "GBS": "4", "PYTEST": "0", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ENGINE / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    assert summary["exit_codes"] == {"bench": 0, "pretrain": 0, "export_hf": 0, "hf_check": 0}, summary["exit_codes"]
    assert summary["hf_check"]["ok"] and summary["hf_check"]["max_rel_err_logits"] <= 1e-4
    assert summary["train"]["steps"] == 3 and summary["train"]["mfu_median"] is None  # a CPU has no peak
    assert summary["bench"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_a_failed_step_fails_the_script_and_is_named(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CKPT": str(tmp_path / "ckpt"), "MODEL": "no-such-model",
           "STEPS": "1", "SEQ": "16", "MB": "1", "GBS": "1", "PYTEST": "0", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ENGINE / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1 and "gpu_check: failed:" in done.stderr and " bench" in done.stderr, done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    assert summary["exit_codes"]["bench"] != 0 and summary["exit_codes"]["pretrain"] != 0
