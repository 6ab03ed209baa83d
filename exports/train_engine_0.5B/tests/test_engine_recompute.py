"""Activation recomputation (model.RECOMPUTE, applied by parallelize.apply_recompute): the same loss and gradients as without it, bitwise on the
CPU, and fewer bytes kept for backward (counted with saved-tensor hooks), in the order none > attention,
mlp > layer; probes' no-grad forwards are unaffected; an unknown choice is refused."""

from __future__ import annotations

import engine_testlib  # noqa: F401 - puts the engine's src on sys.path
import pytest
import torch

from train_engine_0_5b.minicpm.init import init_weights
from train_engine_0_5b.model import RECOMPUTE, build_model, load_weights
from train_engine_0_5b.model_config import preset
from train_engine_0_5b.ops.registry import OpSelection, resolve
from train_engine_0_5b.parallelize import apply_recompute

CFG = preset("tiny")


def _run(recompute: str, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    model = build_model(CFG, resolve(OpSelection(), "cpu"), "cpu", torch.float32)
    apply_recompute(model, recompute)
    load_weights(model, init_weights(model.cfg, 0.1, seed=5))
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss_sum(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, saved


def test_recompute_keeps_values_and_saves_memory():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=gen)
    labels = torch.randint(0, CFG.vocab_size, (2, 24), generator=gen)
    runs = {r: _run(r, ids, labels) for r in RECOMPUTE}
    loss0, grads0, _ = runs["none"]
    for name, (loss, grads, _) in runs.items():
        assert torch.equal(loss, loss0), name
        assert all(torch.equal(grads[n], grads0[n]) for n in grads0), name
    saved = {r: v[2] for r, v in runs.items()}
    assert saved["none"] > saved["mlp"] > saved["layer"]
    assert saved["none"] > saved["attention"] > saved["layer"]


def test_no_grad_forward_is_untouched():
    ids = torch.randint(0, CFG.vocab_size, (1, 8))
    outs = []
    for r in ("none", "layer"):
        model = build_model(CFG, resolve(OpSelection(), "cpu"), "cpu", torch.float32)
        apply_recompute(model, r)
        load_weights(model, init_weights(model.cfg, 0.1, seed=5))
        hidden: list[torch.Tensor] = []
        with torch.no_grad():
            outs.append((model(ids, hidden_states=hidden), hidden))
    assert torch.equal(outs[0][0], outs[1][0])
    assert len(outs[1][1]) == CFG.num_layers + 1 and all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="recompute 'ffn'"):
        apply_recompute(build_model(CFG, resolve(OpSelection(), "cpu"), "cpu", torch.float32), "ffn")


def test_pretrain_with_recompute_logs_the_same_steps(cli, tmp_path):
    from engine_testlib import TINY, read_jsonl

    args = [*TINY, "--num-steps", "3", "--global-batch-size", "4", "--micro-batch-size", "2"]
    for r in ("none", "layer"):
        res = cli(["pretrain", *args, "--recompute", r, "--log-file", tmp_path / f"{r}.jsonl"])
        assert res.exit_code == 0, res.output + res.stderr
    plain, recomputed = read_jsonl(tmp_path / "none.jsonl"), read_jsonl(tmp_path / "layer.jsonl")
    assert len(plain) == 3
    for key in ("loss", "grad_norm", "lr", "valid_tokens"):
        assert [r[key] for r in recomputed] == [r[key] for r in plain], key


@pytest.mark.parametrize("command", ["pretrain", "bench"])
def test_bad_recompute_value_is_a_clear_error(cli, command):
    res = cli([command, "--model", "tiny", "--device", "cpu", "--seq-length", "16", "--recompute", "ffn"])
    assert res.exit_code == 1
    assert "runtime.recompute" in res.stderr or "recompute" in res.stderr
    assert "'none', 'mlp', 'attention' or 'layer'" in res.stderr, res.stderr
