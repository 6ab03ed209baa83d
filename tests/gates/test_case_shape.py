"""Case shapes of gate runs: the `tiny` draw from the seed (ranges, determinism, every schedule kind), the
option shapes of other presets, the world-size override, and the schedules each gate derives from a draw
(M3 keeps all three WSD phases, M6 can always cut at steps // 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gates import m3_optimizer, m6_checkpoint
from gates.case import DEFAULT_BUCKET_MB, draw_shape, hf_param_shapes, make_spec
from gates.context import GateRun
from gates.launch import Engine
from gates.runner import GateOptions
from gates.stacks.torch_ref.optim import lr_at

BASE = Path(__file__).parents[1] / "redteam" / "engines" / "base"
SEEDS = range(400)


def test_draw_ranges_and_determinism():
    shapes = [draw_shape(s) for s in SEEDS]
    assert shapes[17] == draw_shape(17) and shapes[17] != shapes[18]
    for s in shapes:
        assert s.drawn and s.num_layers in (3, 4) and 4096 <= s.vocab_size <= 4600
        assert 64 < s.seq_length <= 160 and s.seq_length & (s.seq_length - 1) != 0, s.seq_length
        assert s.micro_batch_size in (1, 2) and s.grad_accum in (2, 3) and 2 <= s.world_size <= 4
        assert 0.01 <= s.bucket_mb <= 0.05
        assert (s.schedule.decay_steps is not None) == (s.schedule.kind == "wsd")
    assert {s.schedule.kind for s in shapes} == {"wsd", "cosine", "constant"}
    assert {s.tie_word_embeddings for s in shapes} == {True, False}
    assert {s.world_size for s in shapes} == {2, 3, 4} and {s.num_layers for s in shapes} == {3, 4}


def test_drawn_model_and_untied_head():
    """The drawn fields reach the model; `lm_head.weight` exists exactly when the head is untied."""
    for seed in (0, 2):
        s = draw_shape(seed)
        cfg = s.model("tiny")
        got = (cfg.num_layers, cfg.vocab_size, cfg.tie_word_embeddings)
        assert got == (s.num_layers, s.vocab_size, s.tie_word_embeddings)
        assert ("lm_head.weight" in hf_param_shapes(cfg)) == (not s.tie_word_embeddings)


def run_for(**opts) -> GateRun:
    return GateRun("m1_forward", Engine(BASE, "rt_base"), GateOptions(**opts))


def test_gate_run_shapes_and_overrides():
    g = run_for(seed=5)
    assert g.shape == draw_shape(5)
    spec = g.preset_spec(steps=1)
    assert (spec.seq_length, spec.micro_batch_size, spec.seed) == (g.shape.seq_length, g.shape.micro_batch_size, 5)
    assert spec.model.num_layers == g.shape.num_layers and spec.world_size == 1
    assert g.preset_spec(world_size=None, grad_accum=None).world_size == g.shape.world_size  # None: the shape's
    assert run_for(seed=5, world_size=3).shape.world_size == 3  # an explicit option wins over the draw
    big = run_for(seed=5, case="minicpm4-0.5b", device="cuda", seq_length=2048)
    assert not big.shape.drawn and big.shape.seq_length == 2048 and big.shape.world_size == 2
    assert big.shape.bucket_mb == DEFAULT_BUCKET_MB and big.shape.model_overrides() == {}


@pytest.mark.parametrize("steps", [2, 3, 4, 6, 8])
def test_gate_schedules_from_draws(steps):
    """M3: warmup 2, then at least one stable step before the decay; M6: cuttable at steps // 2."""
    for seed in SEEDS:
        shape = draw_shape(seed)
        m3 = m3_optimizer.schedule(shape, steps)
        assert m3.kind == "wsd" and m3.warmup_steps == 2 and m3.decay_steps is not None
        if steps >= 4:
            spec = make_spec("tiny", steps=steps, schedule=m3)
            lrs = [lr_at(t, steps, spec.optimizer, m3) for t in range(1, steps + 1)]
            assert lrs[0] < lrs[1] == lrs[2] == spec.optimizer.lr > lrs[-1]
        spec = make_spec("tiny", steps=steps, schedule=m6_checkpoint.schedule(shape, steps))
        assert m6_checkpoint.truncated_spec(spec, steps // 2) is not None, (seed, spec.schedule)
