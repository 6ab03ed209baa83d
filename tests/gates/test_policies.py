"""Tolerance policies: resolution from names/specs, both error figures, the bitwise rule, NaN and shapes,
the AdamW step cap on weights after optimizer steps, the comparative bf16 rule on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from gates.policies import (ADAMW_STEP_SHARE, BF16_UNIT, DTYPE_BOUNDS, RATIO_K, Scale, adamw_step_cap, compare,
                            compare_scaled, compare_series, reference_scale, resolve_policy, scalar_scale, series_scale)


def test_resolve_names_and_overrides():
    assert resolve_policy("bitwise", "float32").bitwise
    p = resolve_policy("dtype", "bfloat16")
    assert p.comparative and p.ratio == RATIO_K == 2.0 and (p.rel, p.max_rel) == (None, None)
    assert (p.floor_rel, p.floor_max) == DTYPE_BOUNDS["float32"]
    p = resolve_policy("rel=1e-2", "bfloat16")  # an override makes bf16 bounds fixed
    assert not p.comparative and (p.rel, p.max_rel) == (1e-2, DTYPE_BOUNDS["bfloat16"][1])
    p = resolve_policy("dtype", "bfloat16", max_rel=0.3)
    assert not p.comparative and (p.rel, p.max_rel) == (DTYPE_BOUNDS["bfloat16"][0], 0.3)
    assert not resolve_policy("dtype", "float32").comparative and not resolve_policy("bitwise", "bfloat16").comparative
    p = resolve_policy("rel=1e-3", "float32")
    assert (p.rel, p.max_rel) == (1e-3, DTYPE_BOUNDS["float32"][1])
    p = resolve_policy("dtype", "float32", rel=5e-2, max_rel=0.5)
    assert (p.rel, p.max_rel) == (5e-2, 0.5)
    with pytest.raises(ValueError, match="bad policy"):
        resolve_policy("loose", "float32")
    assert DTYPE_BOUNDS["float64"][0] < DTYPE_BOUNDS["float32"][0] < DTYPE_BOUNDS["bfloat16"][0]


def test_figures_and_bounds():
    b = torch.tensor([1.0, -2.0, 4.0, 0.5])
    a = b.clone()
    a[2] += 4e-3  # rel = 4e-3 / ||b|| ; max_rel = 4e-3 / 4
    d = compare("x", a, b, resolve_policy("dtype", "float32"))
    assert d.rel == pytest.approx(4e-3 / b.norm().item(), rel=1e-4)
    assert d.max_abs == pytest.approx(4e-3, rel=1e-4) and d.max_rel == pytest.approx(1e-3, rel=1e-4)
    assert not d.ok and "rel" in d.note and "max_rel" in d.note
    assert (d.bound_rel, d.bound_max) == DTYPE_BOUNDS["float32"]
    assert compare("x", a, b, resolve_policy("rel=5e-2,max=1e-1", "bfloat16")).ok
    with pytest.raises(ValueError, match="float32 reference"):
        compare("x", a, b, resolve_policy("dtype", "bfloat16"))


def test_bitwise_means_every_element():
    b = torch.randn(64, dtype=torch.float64)
    assert compare("x", b.clone(), b, resolve_policy("bitwise", "float64")).ok
    a = b.clone()
    a[7] = torch.nextafter(a[7], torch.tensor(float("inf"), dtype=torch.float64))
    d = compare("x", a, b, resolve_policy("bitwise", "float64"))
    assert not d.ok and d.note == "not bit-identical" and d.rel > 0


def test_nan_shape_and_zero_reference():
    pol = resolve_policy("dtype", "float32")
    assert not compare("x", torch.tensor([float("nan"), 1.0]), torch.ones(2), pol).ok
    d = compare("x", torch.ones(3), torch.ones(2), pol)
    assert not d.ok and "shape" in d.note
    assert compare("z", torch.zeros(3), torch.zeros(3), pol).ok
    assert not compare("z", torch.full((3,), 1e-9), torch.zeros(3), pol).ok


def test_series_are_per_step():
    pol = resolve_policy("dtype", "float32")
    ref = torch.tensor([2.0, 2.0, 2.0])
    diffs = compare_series("losses", torch.tensor([2.0, 2.1, 2.0]), ref, pol)
    assert [d.name for d in diffs] == ["losses[0]", "losses[1]", "losses[2]"]
    assert [d.ok for d in diffs] == [True, False, True]


def test_adamw_step_cap_relaxes_only_the_max_criterion():
    """One element a fraction of a step off (a near-cancelling gradient) passes with the cap; a broad
    difference still fails on rel; one element off by more than the cap fails; bitwise ignores the cap."""
    pol = resolve_policy("dtype", "float32")
    lrs = torch.tensor([5e-4, 1e-3, 1e-3, 1e-4])
    cap = adamw_step_cap(lrs)
    assert cap == pytest.approx(ADAMW_STEP_SHARE * 2.6e-3)
    w = torch.randn(256, 256, dtype=torch.float64) * 0.02
    one = w.clone()
    one[3, 5] += 0.1 * cap  # max_rel ~7e-4 > 1e-4, rel ~1.3e-5 < 2e-5
    assert not compare("w", one, w, pol).ok
    d = compare("w", one, w, pol, step_cap=cap)
    assert d.ok and d.max_rel > pol.max_rel and "but max_abs" in d.note and "AdamW step cap" in d.note
    far = w.clone()
    far[3, 5] += 2 * cap
    d = compare("w", far, w, pol, step_cap=cap)
    assert not d.ok and "> AdamW step cap" in d.note
    broad = w * (1 + 1e-3)  # every element: rel 1e-3, each element well within the cap
    d = compare("w", broad, w, pol, step_cap=cap)
    assert not d.ok and d.note.startswith("rel ")
    assert not compare("w", one, w, resolve_policy("bitwise", "float32"), step_cap=cap).ok
    assert compare("w", w.clone(), w, pol, step_cap=cap).note == ""


def noisy(x: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    """`x` plus Gaussian noise of norm-wise relative size `rel`."""
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return x + n * (rel * x.norm() / n.norm())


def test_comparative_rule_on_hand_made_tensors():
    """err(engine vs fp32) <= K x err(bf16 reference vs fp32) + the fp32 floor, for rel and max_rel; the
    report keeps both errors and the bounds."""
    pol = resolve_policy("dtype", "bfloat16")
    exact = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = noisy(exact, 1e-2, 1)
    scale = reference_scale(ref, exact)
    assert scale.rel == pytest.approx(1e-2)
    ok = compare_scaled("t", noisy(exact, 1.5e-2, 2), exact, scale, pol)
    assert ok.ok and ok.ref_rel == pytest.approx(1e-2) and ok.rel == pytest.approx(1.5e-2)
    assert ok.bound_rel == pytest.approx(RATIO_K * 1e-2 + DTYPE_BOUNDS["float32"][0])
    assert ok.bound_max == pytest.approx(RATIO_K * scale.max_rel + DTYPE_BOUNDS["float32"][1])
    bad = compare_scaled("t", noisy(exact, 3e-2, 2), exact, scale, pol)
    assert not bad.ok and bad.note.startswith("rel 3.000e-02 > 0.02") and "2 x the reference's rel" in bad.note
    spike = noisy(exact, 1e-2, 2)  # norm-wise fine, one element off by 3x the reference's worst
    spike[7] = exact[7] + 3 * (ref - exact).abs().max()
    d = compare_scaled("t", spike, exact, scale, pol)
    assert not d.ok and d.rel < d.bound_rel and d.max_rel > d.bound_max
    assert not compare_scaled("t", exact * float("nan"), exact, scale, pol).ok
    assert "shape" in compare_scaled("t", exact[:5], exact, scale, pol).note


def test_comparative_rule_floor_and_scalars():
    """A series the bf16 reference gets exactly (lrs) is held to the fp32 floor; per-step scalars share the
    series' worst reference error, at least the bf16 unit roundoff; so does a lone scalar (a loss)."""
    pol = resolve_policy("dtype", "bfloat16")
    lrs = torch.tensor([5e-4, 1e-3, 1e-3, 1e-4], dtype=torch.float64)
    s = series_scale(lrs.clone(), lrs, pol)
    assert (s.rel, s.max_rel) == (0.0, 0.0)
    assert compare_scaled("lrs[1]", lrs[1] * (1 + 1e-6), lrs[1], s, pol).ok
    assert not compare_scaled("lrs[1]", lrs[1] * (1 + 1e-3), lrs[1], s, pol).ok
    losses = torch.tensor([8.6, 8.5, 8.3, 8.2], dtype=torch.float64)
    ref = losses * torch.tensor([1 + 1e-5, 1 - 3e-6, 1 + 2e-2, 1], dtype=torch.float64)
    s = series_scale(ref, losses, pol)
    assert s.rel == pytest.approx(2e-2)  # the series' worst step sets every step's scale
    assert compare_scaled("losses[0]", losses[0] * (1 + 3e-2), losses[0], s, pol).ok
    s = series_scale(losses * (1 + 1e-6), losses, pol)
    assert s.rel == BF16_UNIT
    lone = scalar_scale(reference_scale(losses[0] * (1 + 1e-6), losses[0]), 1, pol)
    assert lone.rel == BF16_UNIT
    assert compare_scaled("loss", losses[0] * (1 + 1.5 * BF16_UNIT), losses[0], lone, pol).ok
    assert not compare_scaled("loss", losses[0] * (1 + 3 * BF16_UNIT), losses[0], lone, pol).ok
    assert scalar_scale(Scale(rel=1e-6, max_rel=1e-6), 64, pol).rel == 1e-6  # tensors keep their own
