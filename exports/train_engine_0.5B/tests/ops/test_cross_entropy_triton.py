"""Triton cross-entropy (ops/cross_entropy/triton_fused.py) against an fp64 reference: the registry op
on materialized logits, the chunked fusion with the output projection, and the registry op made of it
(linear_cross_entropy); losses, counts, and the gradients of logits / hidden / weight; ignored labels,
partial blocks and chunks, the gradient pass's row loop, poisoned buffers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from train_engine_0_5b.ops import space  # noqa: E402
from train_engine_0_5b.ops.cross_entropy import triton_fused  # noqa: E402
from train_engine_0_5b.ops.table import check_values  # noqa: E402
from train_engine_0_5b.ops.cross_entropy.triton_fused import (  # noqa: E402
    IGNORE_INDEX,
    _accumulate_mm,
    cross_entropy,
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_fwd_bwd,
    fused_linear_cross_entropy_reference,
    linear_cross_entropy,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")]
# Bounds against fp64 on the same inputs, relative to the largest reference element (the loss is one
# number; gradients are compared as whole tensors). bf16: the logits themselves are rounded to bf16
# (as in the reference's bf16 GEMM), and so is the stored logit gradient.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=GPU)]
V_FULL = 73448  # MiniCPM4's vocabulary: 17 full 4096-blocks and a partial one


def _labels(shape, V, gen, ignore_every=5):
    labels = torch.randint(0, V, shape, generator=gen)
    labels.view(-1)[::ignore_every] = IGNORE_INDEX  # some ignored tokens, including the first
    return labels.to(DEVICE)


def _close(actual, expected, tol):
    assert actual.shape == expected.shape
    err = (actual.double() - expected).abs().max().item()
    bound = tol * expected.abs().max().item()
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


# ---- the registry op: cross_entropy(logits, labels) ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 517), (2, 63, 517), (1, 3, V_FULL), (3, 5, 2)], ids=str)
def test_cross_entropy_matches_fp64(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=gen) * 4).to(DEVICE, dtype).requires_grad_()
    labels = _labels(shape[:-1], shape[-1], gen)
    loss = cross_entropy(logits, labels)
    (loss * 0.37).backward()  # a grad_output other than 1
    l64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(l64, labels)
    (ref * 0.37).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, ref.detach(), LOSS_TOL[dtype])
    assert logits.grad.dtype == dtype
    _close(logits.grad, l64.grad, TOL[dtype])


def test_cross_entropy_compiles_as_one_node_per_direction():
    """Under torch.compile(fullgraph=True) the op is the custom-op pair (no graph break) and gives the
    eager values, with the code around it (a scale before, a division after) compiled."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 17, 300, generator=gen) * 3).to(DEVICE).requires_grad_()
    labels = _labels((2, 17), 300, gen)

    def step(z, y):
        return cross_entropy(z * 1.5, y) / 7

    compiled = torch.compile(step, fullgraph=True)(logits, labels)
    compiled.backward()
    grad = logits.grad.clone()
    l64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(l64 * 1.5, labels) / 7
    ref.backward()
    _close(compiled.detach(), ref.detach(), LOSS_TOL[torch.float32])
    _close(grad, l64.grad, TOL[torch.float32])


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=gen).to(DEVICE).requires_grad_()
    labels = torch.full((4,), IGNORE_INDEX, device=DEVICE)
    loss = cross_entropy(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_poisoned_grad_buffer():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(9, 1000, generator=gen) * 3).to(DEVICE)
    labels = _labels((9,), 1000, gen)
    losses, lse = cross_entropy_fwd(logits, labels)
    grad = torch.full_like(logits, float("nan"))
    cross_entropy_bwd(logits, labels, lse, torch.tensor(1.5, device=DEVICE), grad=grad)
    l64 = logits.double().requires_grad_()
    (cross_entropy_reference(l64, labels) * 1.5).backward()
    assert torch.isfinite(grad).all()
    _close(grad, l64.grad, TOL[torch.float32])
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=0)
    per_row = torch.nn.functional.cross_entropy(l64.detach(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(losses.double(), per_row, rtol=1e-5, atol=1e-6)


LAUNCHES = {"per row": {"BLOCK_V": 256, "num_warps": 4}, "split": {"BLOCK_V": 256, "num_warps": 4, "split": True},
            "split, one block": {"BLOCK_V": 2048, "num_warps": 8, "split": True}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("launch", list(LAUNCHES.values()), ids=list(LAUNCHES))
def test_gradient_pass_launches_match_fp64(launch, dtype):
    """The one-pass gradient kernel per row and split across programs (one per block of a row): V 1000 leaves a
    partial last 256-block; labels sit on block edges (255, 256, 767, 768, 999) and at 0, one row is ignored; the
    gradient buffer starts as NaN, so a block no program writes shows."""
    gen = torch.Generator().manual_seed(7)
    V = 1000
    logits = (torch.randn(8, V, generator=gen) * 3).to(DEVICE, dtype)
    labels = torch.tensor([0, 255, 256, 767, 768, 999, IGNORE_INDEX, 500], device=DEVICE)
    lse = torch.logsumexp(logits.double(), -1).float()
    grad = torch.full_like(logits, float("nan"))
    cross_entropy_bwd(logits, labels, lse, torch.tensor(0.5, device=DEVICE), grad=grad, launch=dict(launch))
    l64 = logits.double().requires_grad_()
    (cross_entropy_reference(l64, labels) * 0.5).backward()
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[6], torch.zeros_like(grad[6]))  # the ignored row
    _close(grad, l64.grad, TOL[dtype])


# ---- fused with the output projection --------------------------------------------------------------


def _linear_inputs(T, h, V, dtype, seed, logit_scale):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, h, generator=gen) * logit_scale).to(DEVICE, dtype)
    weight = (torch.randn(V, h, generator=gen) * h**-0.5 * 3).to(DEVICE, dtype)  # logits of a few units
    return hidden, weight, _labels((T,), V, gen)


def _linear_ref(hidden, weight, labels, logit_scale, grad_out):
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss, count = fused_linear_cross_entropy_reference(h64, w64, labels, logit_scale)
    (loss * grad_out).backward()
    return loss.detach(), count, h64.grad, w64.grad


# (T, h, V, chunk_size, logit_scale): one token; T not a multiple of the chunk (partial last chunk);
# h not a power of two; the full vocabulary at small T; MiniCPM4's logit scale 4
CASES = [(1, 64, 517, 4096, 1.0), (127, 100, 517, 32, 4.0), (70, 64, 129, 64, 4.0), (3, 64, V_FULL, 2, 4.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_linear_cross_entropy_matches_fp64(case, dtype):
    T, h, V, chunk, scale = case
    hidden, weight, labels = _linear_inputs(T, h, V, dtype, seed=T + V, logit_scale=scale)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss, count = fused_linear_cross_entropy(hidden, weight, labels, scale, chunk)
    grad_out = 1.0 / max(int(count), 1)  # the training loss: sum / token count
    (loss * grad_out).backward()
    ref_loss, ref_count, ref_dx, ref_dw = _linear_ref(hidden, weight, labels, scale, grad_out)
    assert loss.dtype == torch.float32 and count.dtype == torch.int64 and int(count) == int(ref_count)
    _close(loss, ref_loss, LOSS_TOL[dtype])
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    _close(hidden.grad, ref_dx, TOL[dtype])
    _close(weight.grad, ref_dw, TOL[dtype])


def test_fused_linear_3d_inputs_and_partial_grads():
    """(B, S, h) hidden; only the weight needs a gradient, then only the hidden; no gradient at all."""
    hidden, weight, labels = _linear_inputs(2 * 9, 48, 300, torch.float32, seed=5, logit_scale=4.0)
    hidden, labels = hidden.view(2, 9, 48), labels.view(2, 9)
    ref_loss, _, ref_dx, ref_dw = _linear_ref(hidden.view(18, 48), weight, labels.view(18), 4.0, 1.0)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, labels, 4.0, 8)[0].backward()
    _close(w.grad, ref_dw, TOL[torch.float32])
    x = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(x, weight, labels, 4.0, 8)[0].backward()
    assert x.grad.shape == (2, 9, 48)
    _close(x.grad.view(18, 48), ref_dx, TOL[torch.float32])
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy(hidden, weight, labels, 4.0, 8)
    _close(loss, ref_loss, LOSS_TOL[torch.float32])


def test_fwd_bwd_writes_dx_and_accumulates_dw_with_grad_scale():
    """dx lands in a poisoned buffer (every element overwritten); dw is added to an existing fp32
    main-grad buffer; the gradients carry `grad_scale` (read on the device)."""
    T, h, V = 45, 40, 211
    hidden, weight, labels = _linear_inputs(T, h, V, torch.float32, seed=8, logit_scale=4.0)
    dx = torch.full_like(hidden, float("nan"))
    dw0 = torch.randn(V, h, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    dw = dw0.clone()
    scale = torch.tensor(0.25, device=DEVICE)
    loss, count, _, _ = fused_linear_cross_entropy_fwd_bwd(
        hidden, weight, labels, logit_scale=4.0, chunk_size=16, grad_scale=scale, dx_out=dx, dw_accum=dw
    )
    ref_loss, ref_count, ref_dx, ref_dw = _linear_ref(hidden, weight, labels, 4.0, 0.25)
    assert torch.isfinite(dx).all() and int(count) == int(ref_count)
    _close(loss, ref_loss, LOSS_TOL[torch.float32])
    _close(dx, ref_dx, TOL[torch.float32])
    _close(dw - dw0, ref_dw, TOL[torch.float32])


def test_fused_linear_all_ignored():
    hidden, weight, _ = _linear_inputs(6, 32, 100, torch.float32, seed=3, logit_scale=1.0)
    labels = torch.full((6,), IGNORE_INDEX, device=DEVICE)
    loss, count, dx, dw = fused_linear_cross_entropy_fwd_bwd(hidden, weight, labels, chunk_size=4)
    assert loss.item() == 0.0 and count.item() == 0
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")
def test_bf16_production_vocab_and_hidden():
    """4096 tokens x h 1024 x V 73448 in bf16 with the default chunk (one full chunk) and a chunk of
    1000 (a partial last chunk): loss and gradients against fp64."""
    hidden, weight, labels = _linear_inputs(4096, 1024, V_FULL, torch.bfloat16, seed=17, logit_scale=4.0)
    ref_loss, ref_count, ref_dx, ref_dw = _linear_ref(hidden, weight, labels, 4.0, 1.0)
    for chunk in (4096, 1000):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, count = fused_linear_cross_entropy(x, w, labels, 4.0, chunk)
        loss.backward()
        assert int(count) == int(ref_count)
        _close(loss, ref_loss, LOSS_TOL[torch.bfloat16])
        _close(x.grad, ref_dx, TOL[torch.bfloat16])
        _close(w.grad, ref_dw, TOL[torch.bfloat16])


# ---- the registry op linear_cross_entropy(x, weight, labels) -------------------------------------


def _registry_ref(x, weight, labels, grad_out):
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss = cross_entropy_reference(x64 @ w64.t(), labels)
    (loss * grad_out).backward()
    return loss.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [5, 4096], ids=["chunks of 5", "one chunk"])
@pytest.mark.parametrize("launch", [(0, 0), (1, 1), (2, 0)], ids=["a program per row", "1 per SM, L2 hints", "2 per SM"])
def test_linear_cross_entropy_matches_fp64(monkeypatch, dtype, chunk, launch):
    """(B, S, h) input, a grad_output other than 1, ignored labels; chunks with a partial last one, or one
    chunk; the gradient pass launched one program per row or looping over rows (a CPU counts as one SM),
    with or without L2 eviction hints."""
    programs_per_sm, l2_hint = launch
    monkeypatch.setattr(triton_fused, "LINEAR_CE_CHUNK", chunk)
    monkeypatch.setattr(space, "_ACTIVE", {("linear_cross_entropy", "triton_fused"): check_values(
        "linear_cross_entropy", "triton_fused", {"programs_per_sm": programs_per_sm, "l2_hint": bool(l2_hint)})})
    B, S, h, V = 2, 7, 40, 517
    x, weight, labels = _linear_inputs(B * S, h, V, dtype, seed=chunk + programs_per_sm + l2_hint, logit_scale=1.0)
    x, labels = x.view(B, S, h).requires_grad_(), labels.view(B, S)
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, labels)
    (loss * 0.37).backward()
    ref_loss, ref_dx, ref_dw = _registry_ref(x, weight, labels, 0.37)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, ref_loss, LOSS_TOL[dtype])
    assert x.grad.shape == (B, S, h) and x.grad.dtype == dtype and weight.grad.dtype == dtype
    _close(x.grad, ref_dx, TOL[dtype])
    _close(weight.grad, ref_dw, TOL[dtype])


def test_linear_cross_entropy_without_grad_gives_the_loss_alone():
    x, weight, labels = _linear_inputs(11, 32, 300, torch.float32, seed=4, logit_scale=1.0)
    with torch.no_grad():
        loss = linear_cross_entropy(x.requires_grad_(), weight.requires_grad_(), labels)
    assert not loss.requires_grad
    _close(loss, _registry_ref(x, weight, labels, 1.0)[0], LOSS_TOL[torch.float32])


def test_linear_cross_entropy_compiles_as_one_node_per_direction():
    """torch.compile(fullgraph=True) of a step around the op (the logit scale before it, a division
    after) gives the eager values: no graph break, the custom ops traced through their fake versions."""
    x, weight, labels = _linear_inputs(2 * 9, 48, 300, torch.float32, seed=6, logit_scale=4.0)
    x, labels = x.view(2, 9, 48).requires_grad_(), labels.view(2, 9)
    weight.requires_grad_()

    def step(x, w, y):
        return linear_cross_entropy(x / 4.0, w, y) / 7

    loss = torch.compile(step, fullgraph=True)(x, weight, labels)
    loss.backward()
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = cross_entropy_reference((x64 / 4.0) @ w64.t(), labels) / 7
    ref.backward()
    _close(loss.detach(), ref.detach(), LOSS_TOL[torch.float32])
    _close(x.grad, x64.grad, TOL[torch.float32])
    _close(weight.grad, w64.grad, TOL[torch.float32])


def test_accumulate_mm_overwrite_ignores_old_values():
    """The first chunk's dw overwrites an uninitialized buffer: NaN in it must not reach the result."""
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(6, 5, generator=gen).to(DEVICE), torch.randn(5, 4, generator=gen).to(DEVICE)
    acc = torch.full((6, 4), float("nan"), device=DEVICE)
    _accumulate_mm(acc, a, b, overwrite=True)
    torch.testing.assert_close(acc, a @ b)
    _accumulate_mm(acc, a, b)
    torch.testing.assert_close(acc, 2 * (a @ b))


def test_linear_cross_entropy_in_the_trainer_matches_unfused(monkeypatch):
    """The tiny model trained 2 steps of 2 micro batches each (gradients accumulated across them, the output
    weight tied to the embedding) with linear_cross_entropy=triton_fused and with the unfused output GEMM +
    CE: the same losses, gradient norms and fp32 master weights (fp32; chunks of 5 tokens, so each micro
    batch spans several; some labels ignored)."""
    from engine_testlib import assert_same_training, train_tiny
    from train_engine_0_5b.ops.registry import OPS

    monkeypatch.setitem(OPS["linear_cross_entropy"], "triton_fused", triton_fused.linear_cross_entropy)
    monkeypatch.setattr(triton_fused, "LINEAR_CE_CHUNK", 5)
    fused = train_tiny("linear_cross_entropy=triton_fused", DEVICE, ignore_first=4)
    assert_same_training(fused, train_tiny("linear_cross_entropy=unfused", DEVICE, ignore_first=4))
