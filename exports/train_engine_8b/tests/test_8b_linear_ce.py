"""The output GEMM and the loss as the registry's one op at TP=1 (`ops.linear_cross_entropy`; on CUDA by default
its fused kernels, which never hold the (tokens, vocab) logits): the Trainer's loss and gradients equal those of
logits-then-cross-entropy. Checked on the CPU through the op's plain-PyTorch reference, which the fused kernels are
tested against in the core's op tests; the log and checkpoints name the implementation that ran. Under TP the loss
is the vocab-parallel cross-entropy, and asking for the fused op there is refused (slow: two gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from test_8b_cli import engine
from train_engine_8b import config
from train_engine_8b.build import build_trainer
from train_engine_8b.core.dist import DistContext
from train_engine_8b.model_config import preset
from train_engine_8b.ops.registry import OpSelection


def _grads(ops: str, seed: int):
    cfg = config.build(model=preset("minicpm4-8b-reduced"), ops=OpSelection.parse(ops),
                       train=dict(num_steps=1, global_batch_size=2, micro_batch_size=2, seq_length=24, seed=seed),
                       runtime=dict(device="cpu", compile=False))
    trainer = build_trainer(cfg, DistContext(), dtype=torch.float64, master_dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=gen)
    labels = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=gen)
    labels[1, :5] = -100
    loss, count = trainer.compute_grads(ids, labels)
    return trainer, float(loss), int(count), {k: g.clone() for k, g in trainer.grads.items()}


def test_the_fused_loss_op_equals_logits_then_cross_entropy():
    seed = int(torch.randint(0, 2**30, ()))
    plain, loss, count, grads = _grads("", seed)
    fused, fused_loss, fused_count, fused_grads = _grads("linear_cross_entropy=reference", seed)
    assert plain.model.linear_cross_entropy is None and plain.model.op_record["names"]["cross_entropy"] == "torch"
    assert fused.model.linear_cross_entropy is not None
    assert fused.model.op_record["names"]["cross_entropy"] == "reference"
    assert count == fused_count == 2 * 24 - 5
    assert fused_loss == pytest.approx(loss, rel=1e-12) and loss > 1.0
    assert grads.keys() == fused_grads.keys()
    for name, g in grads.items():  # the untied head's and the embedding's gradients included
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-10, atol=1e-14, msg=name)
    assert grads["lm_head.weight"].abs().sum() > 0


@pytest.mark.slow
def test_the_fused_loss_op_is_refused_under_tensor_parallelism(tmp_path):
    res = engine(2, ["pretrain", "--model", "minicpm4-8b-reduced", "--device", "cpu", "--tp", "2", "--num-steps", "1",
                     "--global-batch-size", "2", "--micro-batch-size", "2", "--seq-length", "16",
                     "--ops", "linear_cross_entropy=reference"], tmp_path)
    assert res.returncode != 0
    assert "under tensor parallelism the loss is the vocab-parallel cross-entropy" in res.stderr, res.stderr[-2000:]
