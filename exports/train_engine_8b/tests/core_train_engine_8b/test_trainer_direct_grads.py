"""Trainer with an AdamW op that fuses clipping and the bf16 write-back (optim.fuses_clip_and_copy): one
micro batch on one rank skips the fp32 reducer and hands the backward's own gradients to the op; more
micro batches go through the reducer. Either way the losses, gradient norms and weights must match the
unfused path (clip pass, AdamW, copy pass over fp32 gradients) with clipping engaged.

CPU: the engine's small model in bf16 with fp32 masters, the fused op's plain-torch twin
(triton_fused.adamw_reference, the same signature). GPU: the Triton kernel itself against the foreach op."""

from __future__ import annotations

import pytest
import torch

from .core_testlib import engine_import
from .engine_fixture import PACKAGE, small_model

DistContext = engine_import("core.dist").DistContext
AdamW, Schedule, fuses_clip_and_copy = engine_import("core.optim", "AdamW", "Schedule", "fuses_clip_and_copy")
Trainer = engine_import("core.trainer").Trainer
init_weights = engine_import("minicpm.init").init_weights
foreach, reference = engine_import("ops.adamw", "foreach", "reference")
OpSelection, resolve = engine_import("ops.registry", "OpSelection", "resolve")

triton_fused = pytest.importorskip(f"{PACKAGE}.ops.adamw.triton_fused")


def _train(adamw_op, device: str, rows: int, mb: int, steps: int = 3):
    torch.manual_seed(0)
    ops = resolve(OpSelection.parse("attention=sdpa,mlp=unfused"), device, torch.bfloat16)  # the small models'
    model = small_model(ops, device, torch.bfloat16)  # head dims are not FA4's; this test is about the optimizer
    cfg = model.cfg
    opt = AdamW(dict(model.named_parameters()), init_weights(model.cfg, 0.1, seed=3), adamw_op=adamw_op,
                betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, master_dtype=torch.float32)
    trainer = Trainer(model, opt, Schedule("constant", 3e-3, 3e-3, 1, steps), DistContext(device=torch.device(device)),
                      micro_batch_size=mb, grad_clip=0.05, master_dtype=torch.float32)  # small: clipping engages
    gen = torch.Generator().manual_seed(1)
    losses, norms, grad_dtypes = [], [], set()
    step = opt.step

    def recording_step(grads, lr, max_norm, **kw):  # the dtypes of the gradients the optimizer is handed
        grad_dtypes.update(g.dtype for g in grads)
        return step(grads, lr, max_norm, **kw)

    opt.step = recording_step
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (rows, 17), generator=gen).to(device)
        labels = torch.roll(ids, -1, 1)
        labels[0, :5] = -100  # some ignored labels
        res = trainer.train_step(ids, labels)
        losses.append(res.loss.item())
        norms.append(res.grad_norm.item())
        assert all(p.grad is None for p in model.parameters())  # nothing left to add into the next step
        assert trainer.grads is trainer.reducer.grads  # and no reference keeps the direct ones alive
    weights = [w.clone() for w in opt.master]
    params = [p.detach().clone() for p in model.parameters()]
    return losses, norms, weights, params, grad_dtypes


def _assert_same(a, b, weight_tol: dict | None = None):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=0)
    assert min(a[1]) > 0.05  # the norms were above grad_clip: the clip factor was applied
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, **(weight_tol or dict(rtol=1e-5, atol=1e-7)))
    for p, w in zip(a[3], a[2]):  # the compute-dtype parameters are the masters rounded
        assert torch.equal(p, w.to(p.dtype))


def test_only_fused_ops_are_detected():
    assert fuses_clip_and_copy(triton_fused.adamw) and fuses_clip_and_copy(triton_fused.adamw_reference)
    assert not fuses_clip_and_copy(reference.adamw) and not fuses_clip_and_copy(foreach.adamw)


@pytest.mark.parametrize("rows,mb", [(2, 2), (4, 2)])  # one micro batch: direct; two: through the reducer
def test_fused_step_matches_clip_adamw_copy(rows, mb):
    fused = _train(triton_fused.adamw_reference, "cpu", rows, mb)
    plain = _train(reference.adamw, "cpu", rows, mb)
    _assert_same(fused, plain)
    assert plain[4] == {torch.float32}  # the reducer's fp32 slots
    assert fused[4] == ({torch.bfloat16} if rows == mb else {torch.float32})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA device")
def test_triton_step_matches_foreach_on_gpu():
    fused = _train(triton_fused.adamw, "cuda", 2, 2)
    plain = _train(foreach.adamw, "cuda", 2, 2)
    assert fused[4] == {torch.bfloat16}
    # two kernels: fp32 Adam math in another order (sqrt, division) differs in the last bits, which three
    # steps' sqrt(v) can lift to ~6e-5 relative on a few elements (H100: 6 of 262144 at rtol 1e-5)
    _assert_same(fused, plain, weight_tol=dict(rtol=2e-4, atol=1e-5))
