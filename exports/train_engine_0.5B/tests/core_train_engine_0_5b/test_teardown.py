"""`pretrain`'s teardown: every rank meets at a barrier before it destroys its process group, so no rank
finalizes while another still works (rank 0 ends the checkpoint save alone; a TP=2 gloo run whose other rank
had torn down first aborted with SIGABRT: the 8B export's scripts/teardown_loop.sh). A failed run
skips the barrier (a peer may never reach it) and still closes."""

from __future__ import annotations

import pytest

from .core_testlib import engine_import
from .engine_fixture import MODEL

config = engine_import("config")
core_pretrain, dist_mod, errors = engine_import("core", "pretrain", "dist", "errors")
engine_pretrain = engine_import("pretrain")
SMALL = engine_import("model_config").load(MODEL)


def _record(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(dist_mod.DistContext, "barrier", lambda self: calls.append("barrier"))
    monkeypatch.setattr(dist_mod.DistContext, "close", lambda self: calls.append("close"))
    return calls


def test_a_finished_run_meets_its_peers_before_it_closes(monkeypatch, tmp_path):
    calls = _record(monkeypatch)
    train = core_pretrain._train

    def traced(*args, **kwargs):  # the barrier must come after the whole run, the last save included
        out = train(*args, **kwargs)
        calls.append("trained")
        return out

    monkeypatch.setattr(core_pretrain, "_train", traced)
    cfg = config.build(model=SMALL, train=dict(num_steps=1, global_batch_size=2, micro_batch_size=2, seq_length=32),
                       checkpoint=dict(save_dir=str(tmp_path / "save")), runtime=dict(device="cpu", compile=False))
    summary = core_pretrain.run(cfg, engine_pretrain.ENGINE)
    assert summary["steps"] == 1 and (tmp_path / "save" / "latest").exists()
    assert calls[-3:] == ["trained", "barrier", "close"]


def test_a_failed_run_closes_without_the_barrier(monkeypatch, tmp_path):
    calls = _record(monkeypatch)

    def broken(*args, **kwargs):
        raise errors.EngineError("broken on purpose")

    monkeypatch.setattr(core_pretrain, "_train", broken)
    cfg = config.build(model=SMALL, train=dict(num_steps=1, global_batch_size=2, micro_batch_size=2, seq_length=32),
                       runtime=dict(device="cpu", compile=False))
    with pytest.raises(errors.EngineError, match="broken on purpose"):
        core_pretrain.run(cfg, engine_pretrain.ENGINE)
    assert calls == ["close"]
