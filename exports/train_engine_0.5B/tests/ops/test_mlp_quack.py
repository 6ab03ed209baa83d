"""ops/mlp/quack_gated.py and quack_dgated.py: quack's gated GEMMs as custom ops, the rest in torch, and the
kernels themselves.

quack_gated: fc1 with SwiGLU in its epilogue; the backward in torch (cuBLAS + the Triton dSwiGLU pass).
quack_dgated: the same forward, and the fc2 dgrad with the SwiGLU gradient in its epilogue (which also
recomputes postact for fc2's weight gradient).

CPU (always): each wrapper's logic with `_kernels` replaced by plain math that follows quack's contract as
this engine reads it (an interleaved W1, so preact's columns pair gate_j, up_j; postact = silu(gate) * up;
dgated returns the interleaved preact gradient and postact): output and every gradient against
reference.py, gate and up not swapped, a compiled region traced without a graph break, a poisoned kernel
output caught (forward and, for quack_dgated, backward), a wrong output shape refused, a missing package
reported. GPU (sm90+, quack-kernels installed): the real kernels in bf16 against an fp64 reference at the
production shape and at odd token counts (1, 333, 4097: a final partial tile), beside the unfused bf16
path's own error. The GPU test is what checks that quack's contract is the one assumed here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_testlib import rel_err, sm90

from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.ops.mlp import quack_dgated, quack_gated, reference

SHAPES = [(1, 1, 8, 16), (2, 37, 16, 24), (3, 5, 32, 8)]  # (B, S, h, f)
MODULES = {"quack_gated": quack_gated, "quack_dgated": quack_dgated}


def _math_gemm_gated(x, w1it):
    preact = x @ w1it
    return preact, F.silu(preact[:, 0::2]) * preact[:, 1::2]


def _math_gemm_dgated(dout, w2, preact):
    dpost = dout @ w2
    g, u = preact[:, 0::2], preact[:, 1::2]
    sig = torch.sigmoid(g)
    dpre = torch.stack((dpost * u * sig * (1 + g * (1 - sig)), dpost * g * sig), dim=-1).flatten(-2)
    return dpre, F.silu(g) * u


def _math(module, gemm_gated=_math_gemm_gated, gemm_dgated=_math_gemm_dgated):
    if module is quack_gated:
        return quack_gated.Kernels(gemm_gated)
    return quack_dgated.Kernels(gemm_gated, gemm_dgated)


@pytest.fixture(params=sorted(MODULES))
def impl(request, monkeypatch):
    """Each wrapper module, its kernels replaced by the plain math."""
    module = MODULES[request.param]
    monkeypatch.setattr(module, "_kernels", _math(module))
    return module


def _inputs(B, S, h, f, dtype=torch.float64, device="cpu"):
    def w(*shape, fan_in):
        return (torch.randn(*shape, dtype=torch.float32, device=device) * fan_in**-0.5).to(dtype).requires_grad_()

    x = torch.randn(B, S, h, dtype=torch.float32, device=device).to(dtype).requires_grad_()
    return x, w(f, h, fan_in=h), w(f, h, fan_in=h), w(h, f, fan_in=f), torch.randn(B, S, h, device=device).to(dtype)


def _run(fn, x, gate, up, down, dout):
    y = fn(x, gate, up, down)
    return [y, *torch.autograd.grad(y, (x, gate, up, down), dout)]


@pytest.mark.parametrize("shape", SHAPES)
def test_wrapper_output_and_gradients_match_reference(impl, shape):
    args = _inputs(*shape)
    for name, w, x in zip(("y", "dx", "dgate", "dup", "ddown"), _run(reference.mlp, *args), _run(impl.mlp, *args)):
        assert x.shape == w.shape and rel_err(w, x) < 1e-12, (name, rel_err(w, x))


def test_gate_and_up_are_not_swapped(impl):
    """silu(gate) * up is not silu(up) * gate: swapping the two weights must change the output."""
    x, gate, up, down, _ = _inputs(1, 4, 8, 16)
    assert rel_err(impl.mlp(x, gate, up, down), impl.mlp(x, up, gate, down)) > 1e-2


def test_compiled_region_has_no_graph_break(impl):
    x, gate, up, down, dout = _inputs(2, 9, 16, 24, dtype=torch.float32)

    def block(x, gate, up, down):
        return impl.mlp(x * 0.5, gate, up, down) * 2.0

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = _run(compiled, x, gate, up, down, dout)
    want = _run(lambda *a: reference.mlp(a[0] * 0.5, *a[1:]) * 2.0, x, gate, up, down, dout)
    for w, g in zip(want, got):
        assert rel_err(w, g) < 1e-5


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_weight_gradients_come_out_contiguous(impl, compiled):
    """interleave's backward hands gate / up their gradients contiguous (stack's would be strided views of dW1i,
    which autograd copies again outside the compiled graph), equal to the reference's."""
    x, gate, up, down, dout = _inputs(2, 9, 16, 24, dtype=torch.float32)
    fn = torch.compile(impl.mlp, backend="aot_eager", fullgraph=True) if compiled else impl.mlp
    dgate, dup = torch.autograd.grad(fn(x, gate, up, down), (gate, up), dout)
    want = torch.autograd.grad(reference.mlp(x, gate, up, down), (gate, up), dout)
    assert dgate.is_contiguous() and dup.is_contiguous()
    assert rel_err(want[0], dgate) < 1e-5 and rel_err(want[1], dup) < 1e-5


@pytest.mark.parametrize("name", sorted(MODULES))
def test_poisoned_kernel_output_is_visible(monkeypatch, name):
    """A forward kernel that leaves half of postact unwritten (NaN-filled) must show in the output."""
    def half_written(x, w1it):
        preact, post = _math_gemm_gated(x, w1it)
        post[: post.shape[0] // 2] = float("nan")
        return preact, post

    module = MODULES[name]
    monkeypatch.setattr(module, "_kernels", _math(module, gemm_gated=half_written))
    x, gate, up, down, _ = _inputs(1, 6, 8, 16)
    assert torch.isnan(module.mlp(x, gate, up, down)).any()


@pytest.mark.parametrize("poison", ["dpreact", "postact"])
def test_dgated_poisoned_backward_outputs_are_visible(monkeypatch, poison):
    """quack_dgated's backward takes dx / dW1 from the kernel's dpreact and dW2 from its recomputed postact:
    NaN in half of either must reach those gradients (and an unpoisoned run must not have any)."""
    def half_written(dout, w2, preact):
        dpre, post = _math_gemm_dgated(dout, w2, preact)
        (dpre if poison == "dpreact" else post)[: dout.shape[0] // 2] = float("nan")
        return dpre, post

    monkeypatch.setattr(quack_dgated, "_kernels", _math(quack_dgated, gemm_dgated=half_written))
    y, dx, dgate, dup, ddown = _run(quack_dgated.mlp, *_inputs(1, 6, 8, 16))
    assert torch.isfinite(y).all()
    poisoned = (dx, dgate, dup) if poison == "dpreact" else (ddown,)
    clean = (ddown,) if poison == "dpreact" else (dx, dgate, dup)
    assert all(torch.isnan(g).any() for g in poisoned) and all(torch.isfinite(g).all() for g in clean)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_wrong_output_shape_is_refused(monkeypatch, name):
    """The fakes promise (M, 2f) and (M, f) to the compiler; a kernel returning another shape is an error."""
    module = MODULES[name]
    monkeypatch.setattr(module, "_kernels", _math(module, gemm_gated=lambda x, w: (x @ w, x @ w)))
    x, gate, up, down, _ = _inputs(1, 4, 8, 16)
    with pytest.raises(EngineError, match="kernel returned"):
        module.mlp(x, gate, up, down)


def test_dgated_wrong_backward_shape_is_refused(monkeypatch):
    monkeypatch.setattr(quack_dgated, "_kernels", _math(quack_dgated, gemm_dgated=lambda d, w, p: (p, p)))
    with pytest.raises(EngineError, match="dgated kernel returned"):
        _run(quack_dgated.mlp, *_inputs(1, 4, 8, 16))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_missing_package_names_the_reason(monkeypatch, name):
    module = MODULES[name]
    monkeypatch.setattr(module, "_kernels", None)
    monkeypatch.setattr(module, "UNAVAILABLE_REASON", "quack-kernels is not importable (test)")
    x, gate, up, down, _ = _inputs(1, 2, 8, 16)
    with pytest.raises(EngineError, match=f"mlp={name}: quack-kernels is not importable"):
        module.mlp(x, gate, up, down)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_registry_lists_the_module_only_when_it_can_run(name):
    from train_engine_0_5b.ops.registry import OPS, UNAVAILABLE

    module = MODULES[name]
    if module.UNAVAILABLE_REASON:
        assert name not in OPS["mlp"]
        assert "not importable" in UNAVAILABLE[("mlp", name)]
    else:
        assert OPS["mlp"][name] is module.mlp


# ---- the real kernels (GPU) -------------------------------------------------------------------------
GPU_SHAPES = [(8, 4096, 1024, 4096), (1, 1, 1024, 4096), (1, 333, 1024, 4096), (1, 4097, 1024, 4096), (2, 100, 64, 128)]


@pytest.mark.gpu
@pytest.mark.skipif(not sm90() or quack_gated.UNAVAILABLE_REASON is not None,
                    reason=f"needs an sm90+ GPU and quack-kernels ({quack_gated.UNAVAILABLE_REASON})")
@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_bf16_against_fp64(shape, name):
    args = _inputs(*shape, dtype=torch.bfloat16, device="cuda")
    args64 = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
    want = _run(reference.mlp, *args64)
    got = _run(MODULES[name].mlp, *args)
    unfused = _run(reference.mlp, *args)  # the same math in bf16 through cuBLAS: the bar
    for what, w, x, u in zip(("y", "dx", "dgate", "dup", "ddown"), want, got, unfused):
        assert x.shape == w.shape and torch.isfinite(x).all(), what
        err, bar = rel_err(w, x), rel_err(w, u)
        assert err <= max(2 * bar, 1e-2) and err < 2e-2, (what, err, bar)
