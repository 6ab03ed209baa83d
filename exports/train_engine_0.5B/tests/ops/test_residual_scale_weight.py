"""ops/residual_scale/weight.py: MiniCPM's residual scale on the out-projection weights instead of their
outputs. The whole model (tiny preset, fresh random weights and tokens, ignored labels) against the
reference placement: loss and every gradient within fp64 / fp32 rounding, with the MLP unfused or fused
(mlp=reference) and with whole-layer recomputation; the model really runs the other placement (the
add_rms_norm it calls gets r = 1); the parameters stay unscaled (checkpoints and exports are unchanged)."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import rel_err

from train_engine_0_5b.minicpm.init import init_weights
from train_engine_0_5b.model import build_model, load_weights
from train_engine_0_5b.model_config import preset
from train_engine_0_5b.ops.registry import OpSelection, resolve
from train_engine_0_5b.ops.residual_scale import weight
from train_engine_0_5b.parallelize import apply_recompute

CFG = preset("tiny")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # max |got - want| / max |want|


def _loss_and_grads(ops_text: str, dtype, weights, ids, labels, recompute="none", seen=None):
    ops = resolve(OpSelection.parse(ops_text), "cpu")
    if seen is not None:  # record the residual scale add_rms_norm is called with
        inner = ops.add_rms_norm
        ops = type(ops)(**{**ops.__dict__, "add_rms_norm": lambda *a: seen.append(a[-1]) or inner(*a)})
    model = build_model(CFG, ops, "cpu", dtype)
    apply_recompute(model, recompute)
    load_weights(model, weights)
    loss = model.loss_sum(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model


def test_weight_op_scales_the_weight_and_its_gradient():
    w = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = weight.residual_scale(w, 0.3)
    assert torch.equal(y, w.detach() * 0.3)
    g = torch.randn(8, 5, dtype=torch.float64)
    (dw,) = torch.autograd.grad(y, w, g)
    assert torch.equal(dw, g * 0.3)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("mlp, recompute", [("unfused", "none"), ("reference", "none"), ("unfused", "layer")])
def test_weight_placement_matches_the_reference(dtype, mlp, recompute):
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (2, 11), generator=gen)  # odd sequence length
    labels = torch.randint(0, CFG.vocab_size, (2, 11), generator=gen)
    labels[0, :3] = -100
    model = build_model(CFG, resolve(OpSelection(), "cpu"), "cpu", dtype)
    weights = init_weights(model.cfg, 0.1, seed=seed)
    seen_ref, seen_w = [], []
    want = _loss_and_grads(f"mlp={mlp}", dtype, weights, ids, labels, recompute, seen_ref)
    got = _loss_and_grads(f"mlp={mlp},residual_scale=weight", dtype, weights, ids, labels, recompute, seen_w)
    assert set(seen_ref) == {CFG.residual_scale} and CFG.residual_scale != 1.0
    assert set(seen_w) == {1.0} and len(seen_w) == len(seen_ref) > 0  # the other placement really ran
    assert got[2].ops.names["residual_scale"] == "weight"
    assert rel_err(want[0], got[0]) <= TOL[dtype]
    for name, g in want[1].items():
        assert torch.isfinite(got[1][name]).all(), name
        assert rel_err(g, got[1][name]) <= TOL[dtype], (name, rel_err(g, got[1][name]))
    for name, p in got[2].named_parameters():  # parameters keep their HF values: nothing was scaled in place
        assert torch.equal(p.detach(), weights[name].to(dtype)), name


def test_unknown_placement_is_refused():
    from train_engine_0_5b.core.errors import EngineError

    with pytest.raises(EngineError, match="residual_scale.*unknown implementation 'activations'"):
        resolve(OpSelection.parse("residual_scale=activations"), "cpu")


def test_no_multiply_by_r_over_activations_in_the_traced_step():
    """What the placement is for: in the forward and backward graphs AOTAutograd traces for the compiled
    loss (the graphs Inductor gets), every multiply by r is over a weight, none over a (B, S, h) tensor."""
    from functorch.compile import aot_module_simplified, make_boxed_func

    def muls_by_r(sel: str) -> list[tuple[int, ...]]:
        ops = resolve(OpSelection.parse(sel), "cpu")
        model = build_model(CFG, ops, "cpu", torch.float32)
        load_weights(model, init_weights(model.cfg, 0.1, seed=3))
        graphs = []

        def keep(g, _inputs):
            graphs.append(g)
            return make_boxed_func(g.forward)

        backend = lambda gm, ex: aot_module_simplified(gm, ex, fw_compiler=keep, bw_compiler=keep)  # noqa: E731
        ids = torch.randint(0, CFG.vocab_size, (2, 16))
        torch.compile(model.loss_sum, backend=backend, fullgraph=True)(ids, ids).backward()
        assert len(graphs) == 2  # forward, backward
        return [tuple(n.meta["val"].shape) for g in graphs for n in g.graph.nodes
                if n.op == "call_function" and "mul" in str(n.target) and len(n.args) > 1
                and isinstance(n.args[1], float) and n.args[1] == CFG.residual_scale]

    torch._dynamo.reset()
    ref, folded = muls_by_r(""), muls_by_r("residual_scale=weight")
    act = (2, 16, CFG.hidden_size)
    assert ref.count(act) == 4 * CFG.num_layers  # forward and backward, two sublayers per layer
    weight_shapes = {(CFG.hidden_size, CFG.hidden_size), (CFG.hidden_size, CFG.ffn_hidden_size)}
    assert folded and set(folded) <= weight_shapes, folded
