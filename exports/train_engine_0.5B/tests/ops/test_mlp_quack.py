"""ops/mlp/quack_gated.py: quack's gated fc1 GEMM as a custom op, the backward in torch, and the kernel itself.

CPU (always): the wrapper's logic with `_kernels` replaced by plain math that follows quack's contract as
this engine reads it (an interleaved W1, so preact's columns pair gate_j, up_j and postact = silu(gate) * up):
output and every gradient against reference.py, gate and up not swapped, a compiled region traced without
a graph break, a poisoned kernel output caught, a wrong output shape refused, a missing package reported.
GPU (sm90+, quack-kernels installed): the real kernel in bf16 against an fp64 reference at the production
shape and at odd token counts (1, 333, 4097: a final partial tile), beside the unfused bf16 path's own
error. The GPU test is what checks that quack's contract is the one assumed here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_testlib import rel_err, sm90

from train_engine_0_5b.errors import EngineError
from train_engine_0_5b.ops.mlp import quack_gated, reference

SHAPES = [(1, 1, 8, 16), (2, 37, 16, 24), (3, 5, 32, 8)]  # (B, S, h, f)


def _math_gemm_gated(x, w1it):
    preact = x @ w1it
    return preact, F.silu(preact[:, 0::2]) * preact[:, 1::2]


MATH = quack_gated.Kernels(_math_gemm_gated)


@pytest.fixture
def math_kernels(monkeypatch):
    monkeypatch.setattr(quack_gated, "_kernels", MATH)


def _inputs(B, S, h, f, dtype=torch.float64, device="cpu"):
    def w(*shape, fan_in):
        return (torch.randn(*shape, dtype=torch.float32, device=device) * fan_in**-0.5).to(dtype).requires_grad_()

    x = torch.randn(B, S, h, dtype=torch.float32, device=device).to(dtype).requires_grad_()
    return x, w(f, h, fan_in=h), w(f, h, fan_in=h), w(h, f, fan_in=f), torch.randn(B, S, h, device=device).to(dtype)


def _run(fn, x, gate, up, down, dout):
    y = fn(x, gate, up, down)
    return [y, *torch.autograd.grad(y, (x, gate, up, down), dout)]


@pytest.mark.parametrize("shape", SHAPES)
def test_wrapper_output_and_gradients_match_reference(math_kernels, shape):
    args = _inputs(*shape)
    for name, w, x in zip(("y", "dx", "dgate", "dup", "ddown"), _run(reference.mlp, *args), _run(quack_gated.mlp, *args)):
        assert x.shape == w.shape and rel_err(w, x) < 1e-12, (name, rel_err(w, x))


def test_gate_and_up_are_not_swapped(math_kernels):
    """silu(gate) * up is not silu(up) * gate: swapping the two weights must change the output."""
    x, gate, up, down, _ = _inputs(1, 4, 8, 16)
    assert rel_err(quack_gated.mlp(x, gate, up, down), quack_gated.mlp(x, up, gate, down)) > 1e-2


def test_compiled_region_has_no_graph_break(math_kernels):
    x, gate, up, down, dout = _inputs(2, 9, 16, 24, dtype=torch.float32)

    def block(x, gate, up, down):
        return quack_gated.mlp(x * 0.5, gate, up, down) * 2.0

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = _run(compiled, x, gate, up, down, dout)
    want = _run(lambda *a: reference.mlp(a[0] * 0.5, *a[1:]) * 2.0, x, gate, up, down, dout)
    for w, g in zip(want, got):
        assert rel_err(w, g) < 1e-5


def test_poisoned_kernel_output_is_visible(monkeypatch):
    """A kernel that leaves half of postact unwritten (NaN-filled) must show in the output."""
    def half_written(x, w1it):
        preact, post = _math_gemm_gated(x, w1it)
        post[: post.shape[0] // 2] = float("nan")
        return preact, post

    monkeypatch.setattr(quack_gated, "_kernels", quack_gated.Kernels(half_written))
    x, gate, up, down, _ = _inputs(1, 6, 8, 16)
    assert torch.isnan(quack_gated.mlp(x, gate, up, down)).any()


def test_wrong_output_shape_is_refused(monkeypatch):
    """The fake promises (M, 2f) and (M, f) to the compiler; a kernel returning another shape is an error."""
    monkeypatch.setattr(quack_gated, "_kernels", quack_gated.Kernels(lambda x, w: (x @ w, x @ w)))
    x, gate, up, down, _ = _inputs(1, 4, 8, 16)
    with pytest.raises(EngineError, match="kernel returned"):
        quack_gated.mlp(x, gate, up, down)


def test_missing_package_names_the_reason(monkeypatch):
    monkeypatch.setattr(quack_gated, "_kernels", None)
    monkeypatch.setattr(quack_gated, "UNAVAILABLE_REASON", "quack-kernels is not importable (test)")
    x, gate, up, down, _ = _inputs(1, 2, 8, 16)
    with pytest.raises(EngineError, match="not importable"):
        quack_gated.mlp(x, gate, up, down)


def test_registry_lists_quack_gated_only_when_it_can_run():
    from train_engine_0_5b.ops.registry import OPS, UNAVAILABLE

    if quack_gated.UNAVAILABLE_REASON:
        assert "quack_gated" not in OPS["mlp"]
        assert "not importable" in UNAVAILABLE[("mlp", "quack_gated")]
    else:
        assert OPS["mlp"]["quack_gated"] is quack_gated.mlp


# ---- the real kernels (GPU) -------------------------------------------------------------------------
GPU_SHAPES = [(8, 4096, 1024, 4096), (1, 1, 1024, 4096), (1, 333, 1024, 4096), (1, 4097, 1024, 4096), (2, 100, 64, 128)]


@pytest.mark.gpu
@pytest.mark.skipif(not sm90() or quack_gated.UNAVAILABLE_REASON is not None,
                    reason=f"needs an sm90+ GPU and quack-kernels ({quack_gated.UNAVAILABLE_REASON})")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_bf16_against_fp64(shape):
    args = _inputs(*shape, dtype=torch.bfloat16, device="cuda")
    args64 = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
    want = _run(reference.mlp, *args64)
    got = _run(quack_gated.mlp, *args)
    unfused = _run(reference.mlp, *args)  # the same math in bf16 through cuBLAS: the bar
    for name, w, x, u in zip(("y", "dx", "dgate", "dup", "ddown"), want, got, unfused):
        assert x.shape == w.shape and torch.isfinite(x).all(), name
        err, bar = rel_err(w, x), rel_err(w, u)
        assert err <= max(2 * bar, 1e-2) and err < 2e-2, (name, err, bar)
