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


def test_longrope_and_pad_token_are_drawn_and_reach_the_model_and_batches():
    """Half the draws carry MiniCPM4's LongRoPE (either factor list: the original length on both sides of the
    sequence), half a pad token that every row of the batches then looks up."""
    shapes = [draw_shape(s) for s in SEEDS]
    ropes = [s for s in shapes if s.rope_scaling is not None]
    assert 0.35 < len(ropes) / len(shapes) < 0.65 and 0.35 < sum(s.pad_token_id is not None for s in shapes) / len(shapes) < 0.65
    assert {s.seq_length > s.rope_scaling.original_max_position_embeddings for s in ropes} == {True, False}
    seed = next(i for i, s in enumerate(shapes) if s.rope_scaling is not None and s.pad_token_id is not None)
    cfg = shapes[seed].model("tiny")
    assert cfg.rope_scaling == shapes[seed].rope_scaling and cfg.pad_token_id == shapes[seed].pad_token_id
    factors, scale = cfg.rope_at(shapes[seed].seq_length)
    assert len(factors) == cfg.dim_head // 2 and scale > 1  # max_seq_length 1024 > the drawn original length
    from gates.case import random_batches

    spec = make_spec(cfg, steps=2, world_size=2, micro_batch_size=1, grad_accum=2, seq_length=shapes[seed].seq_length)
    ids = random_batches(spec, seed)["input_ids"]
    assert ((ids == cfg.pad_token_id).flatten(0, 2).any(-1)).all()  # every row looks the pad row up


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
