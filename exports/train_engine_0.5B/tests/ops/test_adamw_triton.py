"""Triton AdamW (ops/adamw/triton_fused.py) against an fp64 reference of torch.optim.AdamW's math
(gates/stacks/torch_ref/optim.py): moments, the parameter update, the compute-dtype copies, clipping and
the gradient norm; several steps, mixed decay, sizes around the chunk and block edges, flat-buffer views,
device-tensor lr / step, poisoned copy buffers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from train_engine_0_5b.ops.adamw.triton_fused import (  # noqa: E402
    _CHUNK,
    adamw,
    adamw_reference,
    grad_sq_sum,
    grad_sq_sum_reference,
)
from train_engine_0_5b.core.optim import clip_coefficient  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")]
HP = dict(beta1=0.9, beta2=0.95, eps=1e-8)
# fp32 state against fp64. Moments: relative to the largest element of the reference tensor
# (m = b1*m + (1-b1)*g cancels near zero, where per-element relative bounds mean nothing). Parameters:
# per element, a few fp32 ulps of the parameter (its own rounding) plus a few ulps of the largest update
# (the fp32 arithmetic that made it); a wrong update (a missing bias correction, decay, clip) is far outside.
TOL = dict(moments=2e-6, param_ulps=4, update_ulps=8)
# sizes: one element, odd, a norm weight, a matrix, and more than one chunk with a partial last one
SHAPES = [(1,), (17,), (1024,), (3, 5), (_CHUNK + 7,)]
SHAPES_ALIGNED = [(8,), (1024,), (64, 40), (_CHUNK + 1032,)]  # every size a multiple of 8: 16-byte path


def _close(actual, expected, tol):
    err = (actual.double() - expected).abs().max().item()
    bound = tol * expected.abs().max().item()
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def _close_param(actual, expected, before):
    bound = (TOL["param_ulps"] * expected.abs() + TOL["update_ulps"] * (expected - before).abs().max()) * 2**-23
    excess = ((actual.double() - expected).abs() - bound).max().item()
    assert excess <= 0, f"parameter off by {excess:.3e} beyond its bound"


def _state(shapes, gen, grad_dtype=torch.float32):
    params = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    m = [(torch.randn(s, generator=gen) * 0.01).to(DEVICE) for s in shapes]
    v = [(torch.rand(s, generator=gen) * 1e-4).to(DEVICE) for s in shapes]
    return params, m, v


def _grads(shapes, gen, dtype=torch.float32):
    return [(torch.randn(s, generator=gen) * 3).to(DEVICE, dtype) for s in shapes]


def _run_steps(shapes, weight_decays, grad_dtype, copy_dtype, max_norm, steps=3):
    gen = torch.Generator().manual_seed(len(shapes) + steps)
    p, m, v = _state(shapes, gen)
    p64, m64, v64 = ([t.double() for t in ts] for ts in (p, m, v))
    copies = [torch.full(s, float("nan"), device=DEVICE, dtype=copy_dtype) for s in shapes]
    for step in range(1, steps + 1):
        lr = 1e-3 * step  # a schedule: a different rate each step
        grads = _grads(shapes, gen, grad_dtype)
        norm = grad_sq_sum(grads).sqrt()
        norm64 = grad_sq_sum_reference([g.double() for g in grads]).sqrt()
        torch.testing.assert_close(norm.double(), norm64, rtol=1e-6, atol=0)
        clip = clip_coefficient(norm, max_norm) if max_norm else None
        clip64 = clip_coefficient(norm64, max_norm) if max_norm else None
        before = [t.clone() for t in p]
        before64 = [t.clone() for t in p64]
        adamw(p, grads, m, v, step=step, lr=lr, **HP, weight_decays=weight_decays, param_copies=copies, clip_coef=clip)
        adamw_reference(p64, [g.double() for g in grads], m64, v64, step=step, lr=lr, **HP,
                        weight_decays=weight_decays, clip_coef=clip64)  # fmt: skip
        for a, b in zip(m + v, m64 + v64):
            _close(a, b, TOL["moments"])
        for a, b, b0 in zip(p, p64, before64):
            _close_param(a, b, b0)
        # the copies are the new masters rounded to the copy dtype, every element written
        for c, a in zip(copies, p):
            assert torch.equal(c, a.to(copy_dtype))


@pytest.mark.parametrize("shapes", [SHAPES, SHAPES_ALIGNED], ids=["odd-sizes", "aligned"])
@pytest.mark.parametrize("max_norm", [0.0, 1.0], ids=["no-clip", "clip"])
def test_adamw_matches_fp64_over_steps(shapes, max_norm):
    decays = [0.1, 0.0, 0.0, 0.05, 0.1][: len(shapes)]  # two decay values and undecayed norm-like tensors
    _run_steps(shapes, decays, torch.float32, torch.float32, max_norm)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")
@pytest.mark.parametrize("shapes", [SHAPES, SHAPES_ALIGNED], ids=["odd-sizes", "aligned"])
def test_adamw_bf16_grads_and_copies(shapes):
    _run_steps(shapes, [0.1, 0.0, 0.0, 0.05, 0.1][: len(shapes)], torch.bfloat16, torch.bfloat16, 1.0)


def test_clip_coefficient_matches_torch_clip_grad_norm():
    grads = _grads(SHAPES, torch.Generator().manual_seed(4))
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    norm = grad_sq_sum(grads).sqrt()
    coef = clip_coefficient(norm, 1.0)
    torch.testing.assert_close(norm, torch_norm, rtol=1e-5, atol=0)
    assert coef < 1
    for p, g in zip(params, grads):
        torch.testing.assert_close(g * coef, p.grad, rtol=1e-5, atol=1e-7)


def test_flat_master_buffer_as_views():
    """A flat fp32 master (and flat moments, grads, copies) split into ranges with their own decay: the
    views go in as the tensor lists, one launch updates the whole buffer, the gaps stay untouched."""
    gen = torch.Generator().manual_seed(6)
    n = 2 * _CHUNK + 100
    flat = {k: torch.randn(n, generator=gen).to(DEVICE) for k in ("p", "g", "m")}
    flat["v"] = torch.rand(n, generator=gen).to(DEVICE) * 1e-4
    flat["c"] = torch.full((n,), float("nan"), device=DEVICE)
    ranges = [(0, 1000, 0.1), (1000, 1024, 0.0), (2048, _CHUNK + 5000, 0.1), (_CHUNK + 5000, n, 0.0)]  # gap 2024:2048
    views = {k: [t[a:b] for a, b, _ in ranges] for k, t in flat.items()}
    ref = {k: t.double() for k, t in flat.items()}
    flat0 = ref["p"].clone()
    ref_views = {k: [t[a:b] for a, b, _ in ranges] for k, t in ref.items()}
    decays = [wd for _, _, wd in ranges]
    adamw(views["p"], views["g"], views["m"], views["v"], step=1, lr=1e-2, **HP, weight_decays=decays,
          param_copies=views["c"])  # fmt: skip
    adamw_reference(ref_views["p"], ref_views["g"], ref_views["m"], ref_views["v"], step=1, lr=1e-2, **HP,
                    weight_decays=decays)  # fmt: skip
    _close_param(flat["p"], ref["p"], flat0)
    _close(flat["m"], ref["m"], TOL["moments"])
    _close(flat["v"], ref["v"], TOL["moments"])
    assert torch.isnan(flat["c"][1024:2048]).all() and torch.isfinite(flat["c"][:1024]).all()
    assert torch.isfinite(flat["c"][2048:]).all()


def test_device_tensor_lr_and_step_match_numbers():
    """lr / step given as device tensors (the CUDA-graph form) give the same bits as Python numbers
    (an fp64 lr tensor: an fp32 one would already be a rounded rate)."""
    gen = torch.Generator().manual_seed(7)
    p, m, v = _state(SHAPES_ALIGNED, gen)
    grads = _grads(SHAPES_ALIGNED, gen)
    p2, m2, v2 = ([t.clone() for t in ts] for ts in (p, m, v))
    decays = [0.1, 0.0, 0.1, 0.1]
    adamw(p, grads, m, v, step=5, lr=3e-4, **HP, weight_decays=decays)
    step, lr = torch.tensor(5, device=DEVICE), torch.tensor(3e-4, dtype=torch.float64, device=DEVICE)
    adamw(p2, grads, m2, v2, step=step, lr=lr, **HP, weight_decays=decays)
    for a, b in zip(p + m + v, p2 + m2 + v2):
        assert torch.equal(a, b)
