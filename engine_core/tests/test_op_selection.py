"""`--ops` against what an engine's model runs: an engine that calls only some registry ops (`registry_ops`)
refuses a selection naming any other op or GEMM site, naming each; "auto", the defaults and "unfused" (the plain
modules, which is what runs) pass."""

from __future__ import annotations

import pytest

from .core_testlib import engine_import

EngineError, = engine_import("core.errors", "EngineError")
OpSelection, refuse_unrun = engine_import("ops.registry", "OpSelection", "refuse_unrun")


def test_defaults_and_ops_it_runs_pass() -> None:
    refuse_unrun(OpSelection(), ("attention",), "an engine")
    refuse_unrun(OpSelection.parse("attention=reference,rms_norm=auto,gemm=auto"), ("attention",), "an engine")
    refuse_unrun(OpSelection.parse("mlp=unfused,linear_cross_entropy=unfused"), ("attention",), "an engine")  # runs


@pytest.mark.parametrize("text, named", [
    ("rms_norm=reference", "rms_norm=reference: an engine does not run this op"),
    ("attention=reference,gemm.fc2=concat,swiglu=reference",
     "gemm.fc2=concat,swiglu=reference: an engine does not run these ops"),
])
def test_an_op_it_never_runs_is_named_in_the_error(text: str, named: str) -> None:
    with pytest.raises(EngineError) as e:
        refuse_unrun(OpSelection.parse(text), ("attention", "adamw"), "an engine")
    assert str(e.value) == (f"--ops {named} through the op registry; it runs attention, adamw "
                            "(`info` lists their implementations)")
