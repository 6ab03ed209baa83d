"""Launching through the workspace CLI: `bash agent-loop.sh train --engine ... -- <pretrain options>`.

Two "nodes" (two launches, one process each, c10d rendezvous on 127.0.0.1) train as one DP=2 job:
the same losses and final weights as a DP=1 run on the same data (fp32 addition order only; the
bounds of test_engine_dp.py: 1e-5 on losses and grad norms, assert_adamw_weights_close on the weights),
with rank 0 alone writing the log and the checkpoint.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from engine_testlib import ENGINE, TINY, assert_adamw_weights_close, engine_env, free_port, read_jsonl, rel_err

from train_engine_0_5b.core import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]  # the workspace: agent-loop.sh

REL_TOL = 1e-5
TRAIN = [*TINY, "--num-steps", "3", "--global-batch-size", "4", "--micro-batch-size", "1", "--lr-schedule", "wsd"]


def agent_loop(*args) -> list[str]:
    return ["bash", str(ROOT / "agent-loop.sh"), "train", "--engine", str(ENGINE), *map(str, args)]


def test_single_node_launch_command():
    out = subprocess.run(agent_loop("--nproc-per-node", 2, "--dry-run", "--", "--model", "tiny", "--num-steps", 3),
                         capture_output=True, text=True, env=engine_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert f"PYTHONPATH={ENGINE / 'src'}" in line
    assert "-m torch.distributed.run --nproc-per-node=2 --standalone -m train_engine_0_5b pretrain --model tiny --num-steps 3" in line


@pytest.mark.slow
def test_two_nodes_train_as_one_dp2_job(cli, tmp_path):
    seed = str(int(torch.randint(0, 2**31 - 1, (1,))))
    port = free_port()
    args = [*TRAIN, "--seed", seed, "--save-dir", tmp_path / "dp2", "--log-file", tmp_path / "dp2.jsonl"]
    launch = agent_loop("--nnodes", 2, "--nproc-per-node", 1, "--rdzv-endpoint", f"127.0.0.1:{port}", "--", *args)
    nodes = [subprocess.Popen(launch, env=engine_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    text = "\n".join(outputs)
    assert "on 2 x cpu" in text and "micro 1 x accum 2 x DP 2" in text
    assert text.count("[STEP 3]") == 1  # rank 0 alone reports

    res = cli(["pretrain", *TRAIN, "--seed", seed, "--save-dir", tmp_path / "dp1", "--log-file", tmp_path / "dp1.jsonl"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "micro 1 x accum 4 x DP 1" in res.output
    dp1, dp2 = read_jsonl(tmp_path / "dp1.jsonl"), read_jsonl(tmp_path / "dp2.jsonl")
    assert [r["step"] for r in dp2] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        assert rel_err(torch.tensor([r[key] for r in dp1]), torch.tensor([r[key] for r in dp2])) <= REL_TOL, key
    assert [r["lr"] for r in dp1] == [r["lr"] for r in dp2]
    w1, w2 = ckpt.load(tmp_path / "dp1").master, ckpt.load(tmp_path / "dp2").master
    assert_adamw_weights_close(w1, w2, lrs=[r["lr"] for r in dp1], tol=REL_TOL)
    assert ckpt.load(tmp_path / "dp2").state["world_size"] == 2
