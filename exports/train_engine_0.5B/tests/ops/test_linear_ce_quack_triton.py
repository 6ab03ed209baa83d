"""ops/cross_entropy/quack_triton.py: linear_cross_entropy with each chunk's logits and dx GEMMs on quack.

CPU (always; the CE pass in Triton's interpreter): the op's logic with `_quack.KERNELS` replaced by plain
math that follows quack's contract (out = a @ b written into the given buffer): loss and gradients against
an fp64 reference with chunks that leave a partial last one, every chunk's logits and dx GEMMs taken from
the seam (at the sites whose configs are pinned), a poisoned GEMM output caught, CPU / fp32 inputs
refused naming the fallback, a missing package reported, the registry listing. GPU (sm90+, quack-kernels
installed): the real kernel in bf16 at the production vocabulary and hidden size against fp64, beside
triton_fused's own error (the same op with cuBLAS logits) as the bar.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_testlib import sm90

pytest.importorskip("triton")
from train_engine_0_5b.core.errors import EngineError  # noqa: E402
from train_engine_0_5b.ops import _quack, space, table  # noqa: E402
from train_engine_0_5b.ops.cases import Dims  # noqa: E402
from train_engine_0_5b.ops.cross_entropy import quack_triton, triton_fused  # noqa: E402
from train_engine_0_5b.ops.cross_entropy.reference import cross_entropy as cross_entropy_reference  # noqa: E402

IGNORE_INDEX = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the plain-math seam tests: fp32, on either


def _use_gemms(monkeypatch, gemms: str) -> None:
    """The op's GEMM mode through its declared `lse_epilogue` ("quack_lse": on, "quack": off), for this test."""
    monkeypatch.setitem(space._ACTIVE, ("linear_cross_entropy", "quack_triton"), {"lse_epilogue": gemms == "quack_lse"})


def _inputs(B, S, h, V, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, h, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(V, h, generator=gen) * h**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels.view(-1)[1::5] = IGNORE_INDEX  # some ignored; never the first, so one token still counts
    return x, w, labels.to(device)


def _reference(x, w, labels, grad_out):
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = cross_entropy_reference(x64 @ w64.t(), labels)
    (loss * grad_out).backward()
    return loss.detach(), x64.grad, w64.grad


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.fixture
def math_quack(monkeypatch):
    """_quack.KERNELS as plain math; records each call's (rows, site), "+lse" for the LSE epilogue's."""
    calls: list[tuple[int, str]] = []

    def gemm_into(a, b, out, site):
        calls.append((a.shape[0], site))
        return torch.mm(a, b, out=out)

    def gemm_lse(a, b, out, site):
        calls.append((a.shape[0], site + "+lse"))
        torch.mm(a, b, out=out)
        # per-N-tile partials from the unrounded product, as quack's; tiles of 7 leave a ragged last one
        tiles = (a.double() @ b.double()).split(7, dim=-1)
        return torch.stack([torch.logsumexp(t, dim=-1) for t in tiles], dim=-1).float()

    monkeypatch.setattr(_quack, "KERNELS", SimpleNamespace(gemm_into=gemm_into, gemm_lse=gemm_lse))
    monkeypatch.setattr(quack_triton, "require_hopper_half", lambda *a: None)  # fp32 (and the CPU) here
    return calls


@pytest.mark.parametrize("gemms", ["quack", "quack_lse"])
@pytest.mark.parametrize("chunk", [5, 4096], ids=["chunks of 5", "one chunk"])
def test_matches_fp64_and_takes_every_chunk_from_quack(monkeypatch, math_quack, chunk, gemms):
    monkeypatch.setattr(quack_triton, "LINEAR_CE_CHUNK", chunk)
    _use_gemms(monkeypatch, gemms)
    x, w, labels = _inputs(2, 7, 40, 520, torch.float32, DEVICE, seed=chunk)
    loss = quack_triton.linear_cross_entropy(x, w, labels)
    (loss * 0.37).backward()
    ref_loss, ref_dx, ref_dw = _reference(x, w, labels, 0.37)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert _rel(x.grad, ref_dx) < 1e-5 and _rel(w.grad, ref_dw) < 1e-5
    rows = [min(chunk, 14 - r0) for r0 in range(0, 14, chunk)]  # 14 tokens: the last chunk partial when 5
    logits_site = "output.logits+lse" if gemms == "quack_lse" else "output.logits"
    assert math_quack == [(r, site) for r in rows for site in (logits_site, "output.dgrad")]
    assert {"output.logits", "output.dgrad"} <= set(_quack.SM90_TILES)


@pytest.mark.parametrize("gemms", ["quack", "quack_lse"])
@pytest.mark.parametrize("poisoned", ["output.logits", "output.dgrad"])
def test_poisoned_gemm_output_is_visible(monkeypatch, math_quack, poisoned, gemms):
    """A GEMM that leaves the last row of its output unwritten (NaN) must reach the loss (logits) or dx (dgrad),
    and only those rows of dx."""
    def half_written(a, b, out, site):
        torch.mm(a, b, out=out)
        if site == poisoned:
            out[-1] = float("nan")
        return out

    def half_written_lse(a, b, out, site):
        half_written(a, b, out, site)
        return torch.logsumexp(a.double() @ b.double(), dim=-1, keepdim=True).float()  # one partial per row

    monkeypatch.setattr(_quack, "KERNELS", SimpleNamespace(gemm_into=half_written, gemm_lse=half_written_lse))
    _use_gemms(monkeypatch, gemms)
    x, w, labels = _inputs(1, 6, 16, 304, torch.float32, DEVICE, seed=3)
    labels[0, -1] = 7  # the poisoned row's label counts
    loss = quack_triton.linear_cross_entropy(x, w, labels)
    if poisoned == "output.logits":
        assert torch.isnan(loss)
    else:
        loss.backward()
        assert torch.isfinite(loss) and torch.isnan(x.grad[0, -1]).all() and torch.isfinite(x.grad[0, :-1]).all()


@pytest.mark.parametrize("gemms", ["quack", "quack_lse"], ids=["two reads", "epilogue lse, renormalized"])
def test_the_gradients_and_loss_are_as_exact_as_the_reference_on_rounded_logits(monkeypatch, gemms):
    """Logits stored rounded to bf16 (as on the GPU), the epilogue's logsumexp from the unrounded product. With
    `lse_epilogue` off the gradient pass takes the logsumexp of the logits it reads; with it on, the pass also
    sums each row's exp(logit - lse) and the op renormalizes by that sum (the gradient is the softmax of the
    rounded logits, the loss their logsumexp). Either way both gradients are as close to fp64 as the reference's
    on the same rounded logits (within 25 %), and the loss is that reference's loss."""
    def rounded(p):
        return p.to(torch.bfloat16).to(torch.float32)

    def gemm_into(a, b, out, site):
        return out.copy_(rounded(a.double() @ b.double()))

    def gemm_lse(a, b, out, site):
        product = a.double() @ b.double()
        out.copy_(rounded(product))
        return torch.logsumexp(product, dim=-1, keepdim=True).float()

    monkeypatch.setattr(_quack, "KERNELS", SimpleNamespace(gemm_into=gemm_into, gemm_lse=gemm_lse))
    monkeypatch.setattr(quack_triton, "require_hopper_half", lambda *a: None)
    monkeypatch.setattr(quack_triton, "LINEAR_CE_CHUNK", 32)  # a full chunk and a partial one
    _use_gemms(monkeypatch, gemms)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 48, 64, generator=gen, device=DEVICE).requires_grad_()
    w = (torch.randn(2048, 64, generator=gen, device=DEVICE) * 3 * 64**-0.5).requires_grad_()  # logits of std 3
    labels = torch.randint(0, 2048, (1, 48), generator=gen, device=DEVICE)
    labels[0, 5] = IGNORE_INDEX
    loss = quack_triton.linear_cross_entropy(x, w, labels)
    (loss * 0.37).backward()
    _, exact_dx, exact_dw = _reference(x, w, labels, 0.37)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref_loss = cross_entropy_reference(rounded(xr @ wr.t()), labels)
    (ref_loss * 0.37).backward()
    assert _rel(x.grad, exact_dx) <= 1.25 * _rel(xr.grad, exact_dx), (_rel(x.grad, exact_dx), _rel(xr.grad, exact_dx))
    assert _rel(w.grad, exact_dw) <= 1.25 * _rel(wr.grad, exact_dw), (_rel(w.grad, exact_dw), _rel(wr.grad, exact_dw))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())


def test_quack_lse_without_gradients_gives_the_loss_alone(monkeypatch, math_quack):
    """No gradients: the logits GEMM without the LSE epilogue and the loss-only kernel (one read)."""
    _use_gemms(monkeypatch, "quack_lse")
    x, w, labels = _inputs(1, 9, 24, 304, torch.float32, DEVICE, seed=5)
    with torch.no_grad():
        loss = quack_triton.linear_cross_entropy(x, w, labels)
    assert abs(loss.item() - _reference(x, w, labels, 1.0)[0].item()) <= 1e-5 * abs(loss.item())
    assert math_quack == [(9, "output.logits")]


def test_cpu_or_fp32_inputs_are_refused_naming_the_fallback():
    x, w, labels = _inputs(1, 3, 16, 50, torch.float32, "cpu", seed=1)
    with pytest.raises(EngineError, match="linear_cross_entropy=quack_triton.*bf16/fp16 CUDA"):
        quack_triton.linear_cross_entropy(x, w, labels)


@pytest.mark.parametrize("h, V", [(16, 50), (20, 48)], ids=["vocab 50", "hidden 20"])
def test_widths_quack_cannot_stride_are_refused_naming_the_fallback(math_quack, h, V):
    """quack's GEMMs take 16-byte row strides (multiples of 8 in bf16): other widths get the engine's error, and
    the op table declares the same shapes unsupported (the per-op harness records them so)."""
    x, w, labels = _inputs(1, 3, h, V, torch.float32, DEVICE, seed=4)
    with pytest.raises(EngineError, match="quack_triton needs hidden size and vocabulary multiples of 8.*triton_fused"):
        quack_triton.linear_cross_entropy(x, w, labels)
    assert math_quack == []
    supports = table.spec("linear_cross_entropy").impl("quack_triton").supports
    assert "multiples of 8" in supports(Dims(1, 3, h, 64, 2, 1, 8, V))
    assert supports(Dims(8, 4096, 1024, 4096, 16, 2, 64, 73448)) is None


def test_missing_package_names_the_reason(monkeypatch):
    monkeypatch.setattr(_quack, "KERNELS", None)
    monkeypatch.setattr(_quack, "UNAVAILABLE_REASON", "quack-kernels is not importable (test)")
    x, w, labels = _inputs(1, 3, 16, 50, torch.float32, DEVICE, seed=2)
    with pytest.raises(EngineError, match="quack GEMMs cannot run: quack-kernels is not importable"):
        triton_fused.fused_linear_cross_entropy_fwd_bwd(x.detach()[0], w.detach(), labels[0], gemms="quack")


def test_unknown_gemms_mode_is_refused():
    x, w, labels = _inputs(1, 3, 16, 50, torch.float32, DEVICE, seed=2)
    with pytest.raises(ValueError, match="gemms must be cublas, quack or quack_lse, not 'cutlass'"):
        triton_fused.fused_linear_cross_entropy_fwd_bwd(x.detach()[0], w.detach(), labels[0], gemms="cutlass")


def test_registry_lists_quack_triton_only_when_it_can_run():
    from train_engine_0_5b.ops.registry import OPS, UNAVAILABLE

    assert "quack_triton" not in OPS["cross_entropy"] and ("cross_entropy", "quack_triton") not in UNAVAILABLE
    if quack_triton.UNAVAILABLE_REASON:
        assert "quack_triton" not in OPS["linear_cross_entropy"]
        assert "not importable" in UNAVAILABLE[("linear_cross_entropy", "quack_triton")]
    else:
        assert OPS["linear_cross_entropy"]["quack_triton"] is quack_triton.linear_cross_entropy


@pytest.mark.gpu
@pytest.mark.skipif(not sm90() or quack_triton.UNAVAILABLE_REASON is not None,
                    reason=f"needs an sm90+ GPU and quack-kernels ({quack_triton.UNAVAILABLE_REASON})")
@pytest.mark.parametrize("gemms", ["quack", "quack_lse"])
@pytest.mark.parametrize("tokens,chunk", [(8192, 8192), (4097, 1000), (1, 8192)], ids=str)
def test_kernel_bf16_against_fp64(monkeypatch, tokens, chunk, gemms):
    """MiniCPM4's vocabulary and hidden size; one full chunk, partial chunks, one token."""
    monkeypatch.setattr(quack_triton, "LINEAR_CE_CHUNK", chunk)
    _use_gemms(monkeypatch, gemms)
    monkeypatch.setattr(triton_fused, "LINEAR_CE_CHUNK", chunk)
    x, w, labels = _inputs(1, tokens, 1024, 73448, torch.bfloat16, "cuda", seed=tokens)
    ref_loss, ref_dx, ref_dw = _reference(x, w, labels, 1.0)
    errs = {}
    for name, fn in (("quack", quack_triton.linear_cross_entropy), ("cublas", triton_fused.linear_cross_entropy)):
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = fn(xi, wi, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xi.grad).all() and torch.isfinite(wi.grad).all(), name
        errs[name] = (abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), _rel(xi.grad, ref_dx),
                      _rel(wi.grad, ref_dw))
    for q, c in zip(errs["quack"], errs["cublas"]):
        assert q <= max(2 * c, 1e-3) and q < 2e-2, errs


@pytest.mark.gpu
@pytest.mark.skipif(not sm90() or quack_triton.UNAVAILABLE_REASON is not None,
                    reason=f"needs an sm90+ GPU and quack-kernels ({quack_triton.UNAVAILABLE_REASON})")
def test_epilogue_lse_is_as_exact_as_two_reads_on_large_logits(monkeypatch):
    """Logits of std 3 (the per-op harness's; bf16 rounding of the largest logits moves each row's sum of
    softmax terms off 1): the one-read mode, renormalized, is within 25 % of the two-read mode against fp64 in the
    loss and both gradients, on the real kernels."""
    x, w, labels = _inputs(1, 8192, 1024, 73448, torch.float32, "cpu", seed=21)
    w = (w.detach() * 3).requires_grad_()
    x, w, labels = (x.detach().to("cuda", torch.bfloat16).requires_grad_(),
                    w.to("cuda", torch.bfloat16).detach().requires_grad_(), labels.to("cuda"))
    ref_loss, ref_dx, ref_dw = _reference(x, w, labels, 1.0)
    errs = {}
    for gemms in ("quack", "quack_lse"):
        _use_gemms(monkeypatch, gemms)
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = quack_triton.linear_cross_entropy(xi, wi, labels)
        loss.backward()
        errs[gemms] = (abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), _rel(xi.grad, ref_dx),
                       _rel(wi.grad, ref_dw))
    for one, two in zip(errs["quack_lse"], errs["quack"]):
        assert one <= max(1.25 * two, 1e-6), errs
