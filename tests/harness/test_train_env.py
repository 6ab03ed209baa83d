"""`train` launches the engine's ranks with no agent service's key: not in a rank's environment, nor in the
environment any of its ancestors (torchrun, the forge CLI itself) show in /proc; the job's own tokens (W&B)
pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.prompts import WORKSPACE_ROOT

KEYS = {"ANTHROPIC_API_KEY": "PLANTED-train-anthropic-0123456789", "OPENAI_API_KEY": "sk-proj-PLANTED-train-0123456789ab"}
RANK = r'''
import json, os, sys
from pathlib import Path
keys = sys.argv[sys.argv.index("--keys") + 1].split(",")
found, pid = [], os.getpid()
while pid > 1:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        env = b""
    found += [f"{pid}:{k[:12]}" for k in keys if k.encode() in env]
    stat = Path(f"/proc/{pid}/stat").read_text()
    pid = int(stat[stat.rindex(")") + 2:].split()[1])
out = sys.argv[sys.argv.index("--out") + 1]
Path(out).write_text(json.dumps({"found": found, "env": [k for k in os.environ if "KEY" in k],
                                 "rank": os.environ.get("RANK")}))
'''


@pytest.mark.slow
def test_train_ranks_get_no_key(tmp_path: Path) -> None:
    pkg = tmp_path / "engine/src/fake_engine"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(RANK)
    out = tmp_path / "rank.json"
    r = subprocess.run([sys.executable, "-m", "harness", "train", "--engine", str(tmp_path / "engine"), "--",
                        "--out", str(out), "--keys", ",".join(KEYS.values())], cwd=WORKSPACE_ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, **KEYS, "WANDB_API_KEY": "its-own-wandb-key-0123",
                                                    "PYTHONPATH": str(WORKSPACE_ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["rank"] == "0" and got["found"] == [] and got["env"] == ["WANDB_API_KEY"]
