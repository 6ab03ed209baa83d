"""ops/attention/flash4.py: the custom-op wrapper around FlashAttention-4, and the kernel itself.

CPU (always): the wrapper's logic with `_kernels` replaced by plain math that returns the same things
FA4 does (o and the log-sum-exp; dq, dk, dv from o, do and lse): outputs and gradients against
reference.py through the custom ops' autograd, a compiled model region traced without a graph break
(`fullgraph=True`), poisoned kernel outputs caught, a wrong lse layout refused, the missing package
reported. GPU (sm90+, flash-attn-4 installed): the real kernels in bf16 against an fp64 reference at
the production shape and at edge lengths (1, odd, a final partial tile), beside SDPA's own bf16 error.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_testlib import rel_err, sm90

from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.ops.attention import flash4, reference, sdpa

SHAPES = [(1, 1, 2, 2, 8), (2, 37, 6, 2, 16), (1, 64, 6, 1, 32), (2, 16, 4, 4, 8)]  # (B, S, n, g, d)


def _expand(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.repeat_interleave(n // t.shape[2], dim=2)


def _math_fwd(q, k, v):
    """FA4's forward contract in plain math: o (B, S, n, d) and lse (B, n, S) float32."""
    B, S, n, d = q.shape
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, _expand(k, n), _expand(v, n)))
    s = qh @ kh.transpose(-2, -1) / math.sqrt(d)
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = (torch.exp(s - lse[..., None]) @ vh).transpose(1, 2)
    return o.to(q.dtype).contiguous(), lse.float().contiguous()


def _math_bwd(q, k, v, o, do, lse):
    """FA4's backward contract: gradients from the saved o and lse (no autograd of the forward)."""
    B, S, n, d = q.shape
    g = k.shape[2]
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, _expand(k, n), _expand(v, n)))
    oh, doh = o.transpose(1, 2).double(), do.transpose(1, 2).double()
    s = qh @ kh.transpose(-2, -1) / math.sqrt(d)
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.exp(s - lse.double()[..., None])
    dv = p.transpose(-2, -1) @ doh
    dp = doh @ vh.transpose(-2, -1)
    ds = p * (dp - (doh * oh).sum(-1, keepdim=True))
    dq = ds @ kh / math.sqrt(d)
    dk = ds.transpose(-2, -1) @ qh / math.sqrt(d)
    fold = lambda x: x.view(B, g, n // g, S, d).sum(2).transpose(1, 2)  # noqa: E731 - sum query heads per kv head
    return dq.transpose(1, 2).to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@pytest.fixture
def math_kernels(monkeypatch):
    monkeypatch.setattr(flash4, "_kernels", flash4.Kernels(_math_fwd, _math_bwd))


def _inputs(B, S, n, g, d, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, S, n, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, S, g, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, S, g, d, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, torch.randn(B, S, n, d, dtype=dtype, device=device)


@pytest.mark.parametrize("shape", SHAPES)
def test_wrapper_outputs_and_gradients_match_reference(math_kernels, shape):
    q, k, v, do = _inputs(*shape, dtype=torch.float64)
    want = [reference.attention(q, k, v)]
    want += torch.autograd.grad(want[0], (q, k, v), do)
    got = [flash4.attention(q, k, v)]
    got += torch.autograd.grad(got[0], (q, k, v), do)
    for w, x in zip(want, got):
        assert x.shape == w.shape and rel_err(w, x) < 1e-6, rel_err(w, x)  # lse is float32, as FA4's


def test_compiled_region_has_no_graph_break(math_kernels):
    """The reason for the custom ops: torch.compile traces through them (fullgraph would raise otherwise)."""
    q, k, v, do = _inputs(2, 24, 4, 2, 8)

    def block(q, k, v):
        return (flash4.attention(q * 1.5, k, v) * 2.0).sum(-1)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    dgot = torch.autograd.grad(got, (q, k, v), do.sum(-1))
    want = (reference.attention(q * 1.5, k, v) * 2.0).sum(-1)
    dwant = torch.autograd.grad(want, (q, k, v), do.sum(-1))
    assert rel_err(want, got) < 1e-5
    for w, x in zip(dwant, dgot):
        assert rel_err(w, x) < 1e-5


def test_poisoned_kernel_output_is_visible(monkeypatch):
    """A kernel that leaves part of its output unwritten (NaN-filled buffer) must not pass as correct."""
    def half_written(q, k, v):
        o, lse = _math_fwd(q, k, v)
        o[:, o.shape[1] // 2 :] = float("nan")
        return o, lse

    monkeypatch.setattr(flash4, "_kernels", flash4.Kernels(half_written, _math_bwd))
    q, k, v, _ = _inputs(1, 16, 4, 2, 8)
    assert torch.isnan(flash4.attention(q, k, v)).any()


def test_wrong_lse_layout_is_refused(monkeypatch):
    """The fake implementation promises lse (B, n, S) to the compiler; a kernel returning (B, S, n) is an error."""
    def transposed_lse(q, k, v):
        o, lse = _math_fwd(q, k, v)
        return o, lse.transpose(1, 2).contiguous()

    monkeypatch.setattr(flash4, "_kernels", flash4.Kernels(transposed_lse, _math_bwd))
    q, k, v, _ = _inputs(1, 8, 4, 2, 8)
    with pytest.raises(EngineError, match="lse of shape"):
        flash4.attention(q, k, v)


def test_missing_package_names_the_reason(monkeypatch):
    monkeypatch.setattr(flash4, "_kernels", None)
    monkeypatch.setattr(flash4, "UNAVAILABLE_REASON", "flash-attn-4 is not importable (test)")
    q, k, v, _ = _inputs(1, 4, 2, 1, 8)
    with pytest.raises(EngineError, match="not importable"):
        flash4.attention(q, k, v)


def test_registry_lists_flash4_only_when_it_can_run():
    from train_engine_0_5b.ops.registry import OPS, UNAVAILABLE

    if flash4.UNAVAILABLE_REASON:
        assert "flash4" not in OPS["attention"]
        assert "not importable" in UNAVAILABLE[("attention", "flash4")]
    else:
        assert OPS["attention"]["flash4"] is flash4.attention


# ---- the real kernels (GPU) -------------------------------------------------------------------------
GPU_SHAPES = [(2, 4096, 16, 2, 64), (1, 1, 16, 2, 64), (2, 333, 16, 2, 64), (1, 1000, 16, 2, 64), (1, 4097, 8, 8, 64)]


@pytest.mark.gpu
@pytest.mark.skipif(not sm90() or flash4.UNAVAILABLE_REASON is not None,
                    reason=f"needs an sm90+ GPU and flash-attn-4 ({flash4.UNAVAILABLE_REASON})")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_bf16_against_fp64(shape):
    q, k, v, do = _inputs(*shape, dtype=torch.bfloat16, device="cuda")
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = [reference.attention(q64, k64, v64)]
    want += torch.autograd.grad(want[0], (q64, k64, v64), do.double())
    got = [flash4.attention(q, k, v)]
    got += torch.autograd.grad(got[0], (q, k, v), do)
    ref16 = [sdpa.attention(q, k, v)]
    ref16 += torch.autograd.grad(ref16[0], (q, k, v), do)
    for name, w, x, s in zip(("o", "dq", "dk", "dv"), want, got, ref16):
        assert torch.isfinite(x).all(), name
        err, sdpa_err = rel_err(w, x), rel_err(w, s)
        # bf16 rounding: within 2x SDPA's own error (and 2e-2 absolute ceiling)
        assert err <= max(2 * sdpa_err, 1e-2) and err < 2e-2, (name, err, sdpa_err)
