"""build_trainer on the shared core at TP=2 (gloo, spawned ranks) against TP=1 (this process), and DCP
checkpoints of the optimizer state resumed across layouts. Measured by trainer8b_worker; float64 throughout.

- TP=2 equals TP=1: losses and gradient norms within 1e-12 relative (the sharded GEMMs and collectives only
  reorder fp64 sums, ~1e-14 seen); the whole masters and moments after 4 AdamW steps within 1e-8 relative
  of each tensor's largest magnitude (~1e-11 seen; Adam's g / (|g| + eps) amplifies rounding where g ~ eps).
- A checkpoint restores bit for bit on any layout: the restored masters and moments, gathered, equal what was
  saved (at TP=1, TP=2 and DP=2 with ZeRO-1, from TP=2 and from DP=2 ZeRO-1).
- Resumed on the layout that wrote it the run continues bit for bit (losses, norms, final state); resumed on
  another layout it continues within the TP=2 vs TP=1 bounds above (reduction order differs).
"""

from __future__ import annotations

import socket

import pytest
import torch

import trainer8b_worker as worker
from train_engine_8b.core import checkpoint as ckpt


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(_rel(a[k], b[k]) for k in a)


def _bitwise(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _saved(path) -> dict:
    loaded = ckpt.load(path)
    return {k: v for k, v in loaded.master.items()} | dict(loaded.optim)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TP=2 (2 spawned ranks, a checkpoint after step 2, resumed there) and TP=1 (this process, from scratch and
    from the TP=2 checkpoint)."""
    out = tmp_path_factory.mktemp("trainer8b")
    seed = int(torch.randint(0, 2**30, ()))
    tp2_dir = out / "ck-tp2"
    spawned = worker.spawn([dict(name="tp2", tp=2, steps=[0, 4], save_at=[2], save_dir=str(tp2_dir)),
                            dict(name="tp2-resume", tp=2, steps=[2, 4], resume=str(tp2_dir))],
                           world=2, seed=seed, out=out, port=_port())
    alone = worker.alone([dict(name="tp1", tp=1, steps=[0, 4]),
                          dict(name="tp1-from-tp2", tp=1, steps=[2, 4], resume=str(tp2_dir))], seed, out)
    return spawned | alone | {"_tp2_dir": tp2_dir, "_seed": seed}


@pytest.fixture(scope="module")
def zero1_runs(runs, tmp_path_factory):
    """DP=2 with ZeRO-1 on the same 2 ranks: from scratch with a checkpoint, resumed at TP=2; and resumed from
    the TP=2 checkpoint."""
    out = tmp_path_factory.mktemp("trainer8b-zero1")
    seed = runs["_seed"]  # the TP=2 checkpoint's batches
    dp2_dir = out / "ck-dp2"
    spawned = worker.spawn([
        dict(name="dp2z", tp=1, zero1=True, steps=[0, 4], save_at=[2], save_dir=str(dp2_dir)),
        dict(name="tp2-from-dp2z", tp=2, steps=[2, 4], resume=str(dp2_dir)),
        dict(name="dp2z-from-tp2", tp=1, zero1=True, steps=[2, 4], resume=str(runs["_tp2_dir"])),
    ], world=2, seed=seed, out=out, port=_port())
    return spawned | {"_dp2_dir": dp2_dir}


def test_tp2_trains_as_tp1(runs):
    tp1, tp2 = runs["tp1"], runs["tp2"]
    assert all(loss > 1.0 for loss in tp1["losses"])  # real losses on random tokens (~ln V)
    for a, b in zip(tp2["losses"] + tp2["norms"], tp1["losses"] + tp1["norms"]):
        assert abs(a - b) / abs(b) < 1e-12
    assert _max_rel(tp2["final"], tp1["final"]) < 1e-8
    assert tp2["final"]["model.embed_tokens.weight"][2].abs().max() == 0  # the padding row never moves


@pytest.mark.slow
def test_dp2_zero1_trains_as_tp1(runs, zero1_runs):
    dp2z, tp1 = zero1_runs["dp2z"], runs["tp1"]
    for a, b in zip(dp2z["losses"] + dp2z["norms"], tp1["losses"] + tp1["norms"]):
        assert abs(a - b) / abs(b) < 1e-12
    assert _max_rel(dp2z["final"], tp1["final"]) < 1e-8


def test_checkpoint_layout(runs):
    state = ckpt.load(runs["_tp2_dir"]).state
    assert state["format"] == ckpt.FORMAT == 4 and state["step"] == 2
    assert state["shapes"]["model.layers.0.self_attn.o_proj.weight"] == [256, 4096]
    assert any(name.startswith("optimizer/__1_") for name in state["files"])  # both TP ranks wrote shards


@pytest.mark.parametrize("job", ["tp2-resume", "tp1-from-tp2"])
def test_restore_is_bitwise_on_any_layout(runs, job):
    assert not _bitwise(runs[job]["restored"], _saved(runs["_tp2_dir"]))
    assert runs[job]["step_count"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("job,source", [("dp2z-from-tp2", "_tp2_dir"), ("tp2-from-dp2z", "_dp2_dir")])
def test_restore_zero1_is_bitwise(runs, zero1_runs, job, source):
    assert not _bitwise(zero1_runs[job]["restored"], _saved((runs | zero1_runs)[source]))
    assert zero1_runs[job]["step_count"] == 4


def test_resume_same_layout_is_bitwise(runs):
    a, b = runs["tp2-resume"], runs["tp2"]
    assert a["losses"] == b["losses"][2:] and a["norms"] == b["norms"][2:]
    assert not _bitwise(a["final"], b["final"])


def test_resume_at_tp1_within_rounding(runs):
    _assert_continues(runs["tp1-from-tp2"], runs["tp2"])


@pytest.mark.slow
@pytest.mark.parametrize("job,reference", [("dp2z-from-tp2", "tp2"), ("tp2-from-dp2z", "dp2z")])
def test_resume_zero1_layouts_within_rounding(runs, zero1_runs, job, reference):
    both = runs | zero1_runs
    _assert_continues(both[job], both[reference])


def _assert_continues(a: dict, b: dict) -> None:
    """`a`, resumed at step 2 on another layout, continues `b` within the TP=2 vs TP=1 bounds."""
    for x, y in zip(a["losses"] + a["norms"], b["losses"][2:] + b["norms"][2:]):
        assert abs(x - y) / abs(y) < 1e-12
    assert _max_rel(a["final"], b["final"]) < 1e-8


@pytest.mark.slow
def test_dp2_tp2_zero1_four_ranks(tmp_path):
    """DP=2 x TP=2 with ZeRO-1 (each TP shard's optimizer state split over its DP pair), 4 gloo ranks: trains as
    TP=1, and a checkpoint of it resumes bit for bit on the same layout and restores bit for bit at TP=1."""
    seed = int(torch.randint(0, 2**30, ()))
    ck = tmp_path / "ck"
    got = worker.spawn([dict(name="dp2tp2z", tp=2, zero1=True, micro=1, steps=[0, 4], save_at=[2], save_dir=str(ck)),
                        dict(name="dp2tp2z-resume", tp=2, zero1=True, steps=[2, 4], resume=str(ck))],
                       world=4, seed=seed, out=tmp_path, port=_port())
    got |= worker.alone([dict(name="tp1", tp=1, steps=[0, 4]),
                         dict(name="tp1-from", tp=1, steps=[2, 4], resume=str(ck))], seed, tmp_path)
    full, tp1 = got["dp2tp2z"], got["tp1"]
    for a, b in zip(full["losses"] + full["norms"], tp1["losses"] + tp1["norms"]):
        assert abs(a - b) / abs(b) < 1e-12
    assert _max_rel(full["final"], tp1["final"]) < 1e-8
    resumed = got["dp2tp2z-resume"]
    assert resumed["losses"] == full["losses"][2:] and not _bitwise(resumed["final"], full["final"])
    assert not _bitwise(got["tp1-from"]["restored"], _saved(ck))
