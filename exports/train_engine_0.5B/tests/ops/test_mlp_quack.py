"""ops/mlp/quack_gated.py: the custom-op wrapper around quack's gated GEMMs, and the kernels themselves.

CPU (always): the wrapper's logic with `_kernels` replaced by plain math that follows quack's contract as
this engine reads it (interleaved preact; `concat_layout` "B" reads a [gate; up] operand as interleaved,
"out" writes interleaved rows as [gate; up]): output and every gradient against reference.py, a compiled
region traced without a graph break, a poisoned kernel output caught, a missing package reported.
GPU (sm90+, quack-kernels installed): the real kernels in bf16 against an fp64 reference at the
production shape and at odd token counts (1, 333, 4097: a final partial tile), beside the unfused
bf16 path's own error. The GPU test is what checks that quack's contract is the one assumed here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_testlib import rel_err

from train_engine_0_5b.errors import EngineError
from train_engine_0_5b.ops.mlp import quack_gated, reference

SHAPES = [(1, 1, 8, 16), (2, 37, 16, 24), (3, 5, 32, 8)]  # (B, S, h, f)


def _concat_dim(t: torch.Tensor) -> int:
    return -2 if t.stride(-1) == 1 else -1  # quack's rule: the non-contiguous dim carries [gate; up]


def _interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    a, b = t.chunk(2, dim)
    return torch.stack((a, b), dim=dim % t.ndim + 1).flatten(dim % t.ndim, dim % t.ndim + 1)


def _math_gemm(a, b, concat_layout=None):
    if concat_layout == ("B",):
        b = _interleave(b, _concat_dim(b))
    out = a @ b
    if concat_layout == ("out",):  # interleaved rows -> [gate; up]
        out = torch.cat((out[0::2], out[1::2]))
    return out


def _math_gemm_gated(x, w1t):
    preact = x @ _interleave(w1t, _concat_dim(w1t))
    return preact, F.silu(preact[:, 0::2]) * preact[:, 1::2]


def _math_gemm_dgated(dout, w2, preact):
    g, u = preact[:, 0::2], preact[:, 1::2]
    dpost = dout @ w2
    sig = torch.sigmoid(g)
    dg = dpost * u * sig * (1 + g * (1 - sig))
    du = dpost * F.silu(g)
    return torch.stack((dg, du), dim=-1).flatten(-2), F.silu(g) * u


MATH = quack_gated.Kernels(_math_gemm, _math_gemm_gated, _math_gemm_dgated)


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
    """A backward kernel that leaves half of dpreact unwritten (NaN-filled) must show in the gradients."""
    def half_written(dout, w2, preact):
        dpre, post = _math_gemm_dgated(dout, w2, preact)
        dpre[: dpre.shape[0] // 2] = float("nan")
        return dpre, post

    monkeypatch.setattr(quack_gated, "_kernels", MATH._replace(gemm_dgated=half_written))
    x, gate, up, down, dout = _inputs(1, 6, 8, 16)
    dx = _run(quack_gated.mlp, x, gate, up, down, dout)[1]
    assert torch.isnan(dx).any()


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
def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


GPU_SHAPES = [(8, 4096, 1024, 4096), (1, 1, 1024, 4096), (1, 333, 1024, 4096), (1, 4097, 1024, 4096), (2, 100, 64, 128)]


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90() or quack_gated.UNAVAILABLE_REASON is not None,
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
