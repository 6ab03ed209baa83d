"""The op table (ops/table.py) drives these tests: every implementation row imports (or says why not) and
defines its op; every registered implementation matches its op's reference at odd shapes, on fresh random
inputs, outputs and every gradient; every declared tunable's domain runs and stays correct (interpreter-mode
Triton on a CPU); unknown names and out-of-domain values are errors naming them."""

from __future__ import annotations

import itertools

import pytest
import torch

from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.ops import space
from train_engine_0_5b.ops.cases import EDGE_DIMS, build
from train_engine_0_5b.ops.registry import OPS, UNAVAILABLE
from train_engine_0_5b.ops.table import TABLE, UNFUSED, Param, check_tuned, check_values, describe

ROWS = [(s.name, i) for s in TABLE for i in s.impls]
RUNNABLE = [(op, i.name) for op, i in ROWS if i.name not in ("reference", UNFUSED) and OPS[op].get(i.name) is not None
            and OPS[op]["reference"] is not None]  # fmt: skip
TUNABLE = [(op, i.name, name, v) for op, i in ROWS if (op, i.name) in RUNNABLE for name, p in i.space.items()
           for v in p.domain if v != p.default]  # fmt: skip
REL = 2e-5  # fp32: reductions in another order


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output"
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale else 0.5)  # an exact-zero reference (dq at one key): absolute


@pytest.mark.parametrize("op, impl", ROWS, ids=[f"{op}={i.name}" for op, i in ROWS])
def test_every_row_is_registered_or_says_why(op, impl):
    if impl.name in OPS[op]:
        assert impl.module is None or callable(OPS[op][impl.name]) or impl.name == "reference"
    else:
        assert impl.optional and UNAVAILABLE[(op, impl.name)], (op, impl.name)


@pytest.mark.parametrize("op, impl", RUNNABLE, ids=[f"{op}={i}" for op, i in RUNNABLE])
@pytest.mark.parametrize("dims", EDGE_DIMS, ids=lambda d: f"{d.batch}x{d.seq}x{d.hidden}")
def test_matches_the_reference(op, impl, dims):
    call = build(op, dims, torch.float32, "cpu", seed=hash((op, impl, dims.seq)) % 1000)
    got, want = call.run(OPS[op][impl]), call.run(OPS[op]["reference"])
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert _rel(a, b) < REL, f"output {i}"


@pytest.mark.parametrize("op, impl, name, value", TUNABLE, ids=[f"{o}={i}.{n}={v}" for o, i, n, v in TUNABLE])
def test_every_declared_value_runs_correctly(monkeypatch, op, impl, name, value):
    """The launch reads the value (set as resolve sets it) and the result stays the reference's."""
    monkeypatch.setattr(space, "_ACTIVE", {(op, impl): {name: value}})
    assert space.value(op, impl, name) == value
    call = build(op, EDGE_DIMS[1], torch.float32, "cpu", seed=5)
    for a, b in zip(call.run(OPS[op][impl]), call.run(OPS[op]["reference"])):
        assert _rel(a, b) < REL


def test_unknown_names_and_values_outside_the_domain_are_errors():
    with pytest.raises(EngineError, match="unknown op 'rmsnorm'"):
        check_tuned({"rmsnorm": {"triton_fused": {"num_warps": 4}}})
    with pytest.raises(EngineError, match=r"ops.rms_norm: unknown implementation 'cutlass'"):
        check_values("rms_norm", "cutlass", {})
    with pytest.raises(EngineError, match=r"ops.swiglu=triton_fused: unknown parameter 'block_size'; declared: block, num_warps"):
        check_values("swiglu", "triton_fused", {"block_size": 64})
    with pytest.raises(EngineError, match=r"swiglu=triton_fused: block=100 is outside the declared domain"):
        check_values("swiglu", "triton_fused", {"block": 100})
    with pytest.raises(EngineError, match=r"l2_hint=1 is outside the declared domain"):
        check_values("linear_cross_entropy", "triton_fused", {"l2_hint": 1})  # True is not 1
    with pytest.raises(EngineError, match=r"programs_per_sm=True is outside the declared domain"):
        check_values("linear_cross_entropy", "triton_fused", {"programs_per_sm": True})
    with pytest.raises(ValueError, match="not in the domain"):
        Param(3, (1, 2))
    assert check_values("mlp", "quack_dgated", {"fc2_dgrad_tile": [128, 256, False, 1, 2]}) == {
        "fc2_dgrad_tile": (128, 256, False, 1, 2)}  # JSON lists compare as tuples


def test_describe_is_the_table_as_json():
    import json

    table = json.loads(json.dumps(describe()))
    assert list(table) == [s.name for s in TABLE]
    assert table["swiglu"]["impls"]["triton_fused"]["space"]["block"]["default"] == 1024
    assert table["gemm"]["sites"] == ["qkv", "attn_out", "fc1", "fc2", "output"]
    assert all(p["default"] in p["domain"] or isinstance(p["default"], list)
               for s in table.values() for i in s["impls"].values() for p in i["space"].values())
    assert len(list(itertools.chain.from_iterable(s.impls for s in TABLE))) == len(ROWS)
