"""ZeRO-1 (`--zero1`): two gloo ranks under torchrun, optimizer state sharded, small buckets so that
the shards cut parameters mid-way. Against the unsharded DP=2 run on the same data: the same losses and
grad norms, and the same final weights (core_testlib.assert_adamw_weights_close, as in the workspace's tests/engines/test_engine_dp.py:
only the order of fp32 additions in the gradient norm differs). A sharded run stopped and resumed from its checkpoint (each
rank's shards, through DCP) repeats the straight sharded run bit for bit (losses, grad norms, weights, moments), and that
checkpoint resumes without sharding too, on 2 ranks and on 1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from .core_testlib import assert_adamw_weights_close, engine_env, engine_import, read_jsonl, rel_err, torchrun
from .engine_fixture import ENGINE, PACKAGE, SMALL_RUN

ckpt = engine_import("core.checkpoint")

BASE = [*SMALL_RUN, "--global-batch-size", "4", "--micro-batch-size", "1", "--bucket-mb", "0.05", "--grad-clip", "0.5"]


def _run(tmp_path, name: str, *extra) -> None:
    proc = torchrun(2, ["pretrain", *BASE, "--num-steps", "4", "--log-file", tmp_path / f"{name}.jsonl", "--save-dir", tmp_path / name, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(save) -> dict[str, torch.Tensor]:
    return ckpt.load(save).master  # whole, in this process, from both ranks' shards


@pytest.mark.slow
def test_zero1_matches_unsharded_and_resumes(tmp_path):
    _run(tmp_path, "plain")
    _run(tmp_path, "zero1", "--zero1")
    plain, sharded = read_jsonl(tmp_path / "plain.jsonl"), read_jsonl(tmp_path / "zero1.jsonl")
    assert [r["step"] for r in sharded] == [1, 2, 3, 4]
    # grad norm: fp32 sums of squares in another grouping (per piece, then over ranks); on this CPU both runs'
    # norms were ~1e-5 off the fp64 norm of the same (identical) gradients, so the bound is 1e-4
    for key, bound in (("loss", 1e-5), ("grad_norm", 1e-4)):
        err = rel_err(torch.tensor([r[key] for r in plain]), torch.tensor([r[key] for r in sharded]))
        assert err <= bound, (key, err)
    assert max(r["grad_norm"] for r in plain) > 0.5  # clipping engaged
    w_plain, w_sharded = _weights(tmp_path / "plain"), _weights(tmp_path / "zero1")
    assert_adamw_weights_close(w_plain, w_sharded, lrs=[r["lr"] for r in plain])

    # stopped after 2 steps (checkpoint), then resumed: bitwise the straight sharded run
    _run(tmp_path, "resumed", "--zero1", "--exit-after-steps", "2")
    _run(tmp_path, "resumed", "--zero1", "--resume")
    resumed = read_jsonl(tmp_path / "resumed.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in sharded], key
    a, b = ckpt.load(tmp_path / "resumed"), ckpt.load(tmp_path / "zero1")
    assert a.state["format"] == 4 and a.state["zero1"] and {"optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= set(a.state["files"])
    for part in ("master", "optim"):
        ta, tb = getattr(a, part), getattr(b, part)
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in tb), part

    # the sharded checkpoint at step 4 reads as whole tensors: unsharded runs on 2 ranks and on 1 continue from it
    assert all(b.optim[f"exp_avg_sq.{n}"].shape == w.shape and b.optim[f"exp_avg_sq.{n}"].abs().sum() > 0
               for n, w in w_sharded.items())
    for nproc in (2, 1):
        save = tmp_path / f"continued{nproc}"
        shutil.copytree(tmp_path / "zero1", save)
        proc = torchrun(nproc, ["pretrain", *BASE, "--num-steps", "5", "--save-dir", save, "--resume",
                                "--log-file", tmp_path / f"continued{nproc}.jsonl"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [r["step"] for r in read_jsonl(tmp_path / f"continued{nproc}.jsonl")] == [5]
        assert ckpt.load(save).step == 5 and ckpt.load(save).state["world_size"] == nproc


FAIL_ON_RANK_1 = '''
import errno, os
from torch.distributed.checkpoint import filesystem

real = filesystem._write_item


def _write_item(transforms, stream, data, write_item, storage_key, *args):
    if os.environ.get("RANK") == "1" and "step_00000002" in str(getattr(stream, "name", "")):
        raise OSError(errno.ENOSPC, "No space left on device", stream.name)
    return real(transforms, stream, data, write_item, storage_key, *args)


filesystem._write_item = _write_item
'''


@pytest.mark.slow
def test_a_save_failing_on_one_rank_stops_every_rank_and_loses_nothing(tmp_path):
    """Rank 1's shard write fails (a full disk, injected by a sitecustomize): both ranks stop with one line, the
    temporary directory is gone, the last good checkpoint and `latest` stay."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    save = tmp_path / "save"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", PACKAGE,
           "pretrain", *map(str, BASE), "--num-steps", "3", "--zero1", "--save-interval", "1", "--save-dir", str(save)]
    env = engine_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "inject"), env["PYTHONPATH"]])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ENGINE)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors and all("cannot write checkpoint step_00000002" in e and "No space left on device" in e
                          and "step_00000001" in e for e in errors), proc.stderr[-3000:]
    assert len(errors) == 2 and str(ENGINE / "src") not in proc.stderr, proc.stderr[-3000:]  # no engine traceback (torchrun prints its own)
    assert sorted(p.name for p in save.iterdir()) == ["config.toml", "latest", "step_00000001"]
    assert ckpt.load(save).step == 1
