"""Tolerance policies: resolution from names/specs, both error figures, the bitwise rule, NaN and shapes,
the AdamW step cap on weights after optimizer steps."""

from __future__ import annotations

import pytest
import torch

from gates.policies import ADAMW_STEP_SHARE, DTYPE_BOUNDS, adamw_step_cap, compare, compare_series, resolve_policy


def test_resolve_names_and_overrides():
    assert resolve_policy("bitwise", "float32").bitwise
    p = resolve_policy("dtype", "bfloat16")
    assert (p.rel, p.max_rel) == DTYPE_BOUNDS["bfloat16"]
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
    assert compare("x", a, b, resolve_policy("dtype", "bfloat16")).ok


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
