"""ZeRO-1 (`--zero1`): two gloo ranks under torchrun, optimizer state sharded, small buckets so that
the shards cut parameters mid-way. Against the unsharded DP=2 run on the same data: the same losses and
grad norms, and the same final weights (engine_testlib.assert_adamw_weights_close, as in test_engine_dp.py:
only the order of fp32 additions in the gradient norm differs). A sharded run stopped and resumed from its checkpoint (saved whole) repeats
the straight sharded run bit for bit, and that checkpoint resumes without sharding too."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import TINY, assert_adamw_weights_close, read_jsonl, rel_err, torchrun
from safetensors.torch import load_file

BASE = [*TINY, "--global-batch-size", "4", "--micro-batch-size", "1", "--bucket-mb", "0.05", "--grad-clip", "0.5"]


def _run(tmp_path, name: str, *extra) -> None:
    proc = torchrun(2, ["pretrain", *BASE, "--num-steps", "4", "--log-file", tmp_path / f"{name}.jsonl", "--save-dir", tmp_path / name, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(save) -> dict[str, torch.Tensor]:
    return load_file(str(save / (save / "latest").read_text().strip() / "model.safetensors"))


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
    w_resumed = _weights(tmp_path / "resumed")
    assert all(torch.equal(w_resumed[n], w_sharded[n]) for n in w_sharded)

    # the sharded checkpoint at step 4 holds whole tensors: an unsharded run continues from it
    opt = load_file(str(tmp_path / "zero1" / (tmp_path / "zero1" / "latest").read_text().strip() / "optimizer.safetensors"))
    assert all(opt[f"exp_avg_sq.{n}"].shape == w.shape and opt[f"exp_avg_sq.{n}"].abs().sum() > 0 for n, w in w_sharded.items())
    proc = torchrun(2, ["pretrain", *BASE, "--num-steps", "5", "--save-dir", tmp_path / "zero1", "--resume",
                        "--log-file", tmp_path / "continued.jsonl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "continued.jsonl")] == [5]
