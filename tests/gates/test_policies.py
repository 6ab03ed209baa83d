"""Tolerance policies: resolution from names/specs, both error figures, the bitwise rule, NaN and shapes."""

from __future__ import annotations

import pytest
import torch

from gates.policies import DTYPE_BOUNDS, compare, compare_series, resolve_policy


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
