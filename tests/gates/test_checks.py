"""Contract checks on engine outputs: missing names, shapes, non-finite values, copies of inputs; the
first problem in layer order is the localization."""

from __future__ import annotations

import pytest
import torch

from gates.case import load_case, make_spec, new_case
from gates.checks import check_outputs, expected_shapes, layer_of, layer_order


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return load_case(new_case(tmp_path_factory.mktemp("case"), make_spec("tiny", steps=2, seed=3)))


def outputs(probe, case):
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in expected_shapes(probe, case).items()}


def test_good_outputs_pass(case):
    for probe in ("forward", "backward", "steps"):
        assert check_outputs(probe, outputs(probe, case), case) is None


def test_missing_and_shape(case):
    out = outputs("forward", case)
    del out["hidden_states.1"], out["logits"]
    loc = check_outputs("forward", out, case)
    assert loc.tensor == "hidden_states.1" and "2 missing" in loc.what and loc.layer == 0
    out = outputs("backward", case)
    out["grad.model.layers.1.mlp.up_proj.weight"] = torch.zeros(3)
    assert check_outputs("backward", out, case).tensor == "grad.model.layers.1.mlp.up_proj.weight"


def test_first_non_finite_in_layer_order(case):
    out = outputs("forward", case)
    out["loss"] = torch.tensor(float("nan"))
    out["hidden_states.2"][0, 0, 0] = float("inf")
    loc = check_outputs("forward", out, case)
    assert (loc.tensor, loc.layer) == ("hidden_states.2", 1) and "inf" in loc.what


def test_copies_of_inputs(case):
    out = outputs("steps", case)
    out["weight.model.layers.0.self_attn.v_proj.weight"] = case.weights["model.layers.0.self_attn.v_proj.weight"].clone()
    loc = check_outputs("steps", out, case)
    assert loc.tensor == "weight.model.layers.0.self_attn.v_proj.weight" and "although lr > 0" in loc.what
    assert check_outputs("steps", out, case, lr_positive=False) is None
    out = outputs("backward", case)
    out["grad.model.norm.weight"] = case.weights["model.norm.weight"].clone()
    loc = check_outputs("backward", out, case)
    assert loc.tensor == "grad.model.norm.weight" and "copy of the input weight model.norm.weight" in loc.what
    out = outputs("forward", case)
    out["hidden_states.1"] = case.global_batch(1)[0].float()[..., None].expand_as(out["hidden_states.1"]).clone()
    assert check_outputs("forward", out, case) is None  # derived from an input, not a copy of one


def test_layer_helpers(case):
    assert layer_of("hidden_states.0") == -1 and layer_of("grad.model.layers.3.mlp.up_proj.weight") == 3
    names = ["loss", "logits", "hidden_states.1", "hidden_states.0"]
    assert layer_order(names, case) == ["hidden_states.0", "hidden_states.1", "logits", "loss"]
    names = ["weight.model.norm.weight", "weight.model.layers.1.mlp.up_proj.weight", "losses",
             "weight.model.embed_tokens.weight"]
    assert layer_order(names, case) == ["losses", "weight.model.embed_tokens.weight",
                                        "weight.model.layers.1.mlp.up_proj.weight", "weight.model.norm.weight"]
