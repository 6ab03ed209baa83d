"""The registry ops the 8B runs besides attention and AdamW, at TP=1: the output GEMM and the loss as one op
(`linear_cross_entropy`; on CUDA by default its fused kernels, which never hold the (tokens, vocab) logits) and,
when asked, the MLP as one op (`mlp`: fc1 -> SwiGLU -> fc2; no election at the 8B's shapes yet). The Trainer's
loss and gradients equal those of the plain modules. Checked on the CPU through each op's plain-PyTorch reference,
which the fused kernels are tested against in the core's op tests; the log and checkpoints name what ran. Under
TP the loss is the vocab-parallel cross-entropy and the MLP the parallel projections: asking for either fused op
there is refused (slow: two gloo ranks), and so is naming an op this engine never runs (registry_ops)."""

from __future__ import annotations

import pytest
import torch

from test_8b_cli import engine
from train_engine_8b import config
from train_engine_8b.build import build_trainer
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.errors import EngineError
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


@pytest.mark.parametrize("ops, ran", [
    ("linear_cross_entropy=reference", {"cross_entropy": "reference", "mlp": "unfused"}),
    ("mlp=reference", {"cross_entropy": "torch", "mlp": "reference"}),
    ("linear_cross_entropy=reference,mlp=reference", {"cross_entropy": "reference", "mlp": "reference"}),
])
def test_a_fused_op_equals_the_plain_modules(ops, ran):
    seed = int(torch.randint(0, 2**30, ()))
    plain, loss, count, grads = _grads("", seed)
    fused, fused_loss, fused_count, fused_grads = _grads(ops, seed)
    names = plain.model.op_record["names"]
    assert (names["cross_entropy"], names["mlp"]) == ("torch", "unfused")  # the CPU's defaults: the plain modules
    assert plain.model.linear_cross_entropy is None and plain.model.model.layers[0].mlp.mlp_op is None
    assert {k: fused.model.op_record["names"][k] for k in ran} == ran
    assert (fused.model.linear_cross_entropy is not None) == (ran["cross_entropy"] == "reference")
    assert all((layer.mlp.mlp_op is not None) == (ran["mlp"] == "reference") for layer in fused.model.model.layers)
    assert count == fused_count == 2 * 24 - 5
    assert fused_loss == pytest.approx(loss, rel=1e-12) and loss > 1.0
    assert grads.keys() == fused_grads.keys()
    for name, g in grads.items():  # the untied head's, the embedding's and every projection's gradients
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-10, atol=1e-14, msg=name)
    assert grads["lm_head.weight"].abs().sum() > 0 and grads["model.layers.0.mlp.gate_proj.weight"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("op", ["linear_cross_entropy", "mlp"])
def test_a_fused_op_is_refused_under_tensor_parallelism(tmp_path, op):
    res = engine(2, ["pretrain", "--model", "minicpm4-8b-reduced", "--device", "cpu", "--tp", "2", "--num-steps", "1",
                     "--global-batch-size", "2", "--micro-batch-size", "2", "--seq-length", "16",
                     "--save-dir", tmp_path / "ckpt", "--ops", f"{op}=reference"], tmp_path)
    assert res.returncode != 0
    assert (f"--ops {op}=reference: train_engine_8b at --tp 2 does not run this op through the op registry; "
            "it runs attention, adamw") in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "ckpt").exists() and "[STEP" not in res.stdout  # refused before any step or save


@pytest.mark.parametrize("ops, named", [
    ("rms_norm=triton_fused", "rms_norm=triton_fused: train_engine_8b does not run this op"),
    ("gemm.qkv=concat,swiglu=reference", "gemm.qkv=concat,swiglu=reference: train_engine_8b does not run these ops"),
])
def test_an_op_the_engine_never_runs_is_refused(ops, named):
    cfg = config.build(model=preset("minicpm4-8b-reduced"), ops=OpSelection.parse(ops),
                       train=dict(num_steps=1, global_batch_size=2, micro_batch_size=2, seq_length=24),
                       runtime=dict(device="cpu", compile=False))
    with pytest.raises(EngineError, match="through the op registry; it runs attention, adamw, linear_cross_entropy, mlp") as e:
        build_trainer(cfg, DistContext(), dtype=torch.float32)
    assert f"--ops {named}" in str(e.value)


def test_info_lists_the_ops_it_runs_only(tmp_path):
    res = engine(1, ["info"], tmp_path)
    ops = [line.split(":")[0] for line in res.stdout.splitlines() if line.startswith("op ")]
    assert res.returncode == 0 and ops == ["op attention", "op mlp", "op linear_cross_entropy", "op adamw"]
    assert "under --tp > 1 it runs attention, adamw only" in res.stdout
