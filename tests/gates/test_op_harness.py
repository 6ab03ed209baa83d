"""The per-op harness (gates/ops): a copy of the real engine with deliberately broken candidates added to its op
table (interpreter-mode Triton on the CPU). A launch config that leaves columns unwritten, an op that returns
memory it never wrote (the reference's freed result would be there without the poisoning), and one whose NaN
the reference does not have all fail; correct candidates pass with the harness's own timing; unknown names are
errors before anything runs; the leaderboard keeps every candidate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gates.ops.harness import Candidate, HarnessOptions, OpSpecError, check_candidate, describe, leaderboard_path, record

ENGINE = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B"
OPTIONS = HarnessOptions(reps=2, warmup=1, seq=8, timeout_s=300)

# swiglu=triton_fused with block 256 launches cdiv -> floor column blocks: rows narrower than 256 are never written
SKIP_COLUMNS = ("    n_col_blocks = triton.cdiv(f, block)\n",
                "    n_col_blocks = f // block if block == 256 else triton.cdiv(f, block)  # broken on purpose\n")
LAZY = '''"""Broken on purpose: allocates its output and never writes it."""
import torch


def swiglu(gate, up):
    return _Lazy.apply(gate, up)


class _Lazy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        return torch.empty_like(gate)

    @staticmethod
    def backward(ctx, dout):
        return torch.empty_like(dout), torch.empty_like(dout)
'''
NAN = '''"""Broken on purpose: right everywhere but one NaN."""
from train_engine_0_5b.ops.swiglu.reference import swiglu as _ref


def swiglu(gate, up):
    out = _ref(gate, up)
    return out.index_fill(-1, out.new_zeros(1, dtype=__import__("torch").long), float("nan"))
'''
CRASH = '''"""Broken on purpose: raises at the 200-wide edge shape, as a kernel that cannot stride it does."""
from train_engine_0_5b.ops.swiglu.reference import swiglu as _ref


def swiglu(gate, up):
    if gate.shape[-1] == 200:
        raise ValueError("stride not divisible by 8")
    return _ref(gate, up)
'''
ROWS = ('"swiglu", (Impl("reference", "swiglu.reference"), ',
        '"swiglu", (Impl("reference", "swiglu.reference"), Impl("lazy", "swiglu.lazy"), Impl("nan", "swiglu.nan"), '
        'Impl("crash", "swiglu.crash"), '
        # correct, but declaring shapes it cannot run: one edge shape, the production shape, every edge shape
        'Impl("no_1x1", "swiglu.reference", supports=lambda d: "not one token" if d.seq == 1 else None), '
        'Impl("no_prod", "swiglu.reference", supports=lambda d: "not 8 tokens" if d.seq == 8 else None), '
        'Impl("no_edges", "swiglu.reference", supports=lambda d: None if d.seq == 8 else "only 8 tokens"), ')


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine") / "train_engine_0.5B"
    shutil.copytree(ENGINE / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "data"))
    pkg = root / "src" / "train_engine_0_5b"
    shutil.copytree(ENGINE / "src" / "train_engine_0_5b" / "data", pkg / "data", ignore=shutil.ignore_patterns("*.gz"))
    for path, (old, new) in ((pkg / "ops/swiglu/triton_fused.py", SKIP_COLUMNS), (pkg / "ops/table.py", ROWS)):
        text = path.read_text()
        assert text.count(old) == 1, (path, old)
        path.write_text(text.replace(old, new))
    (pkg / "ops/swiglu/lazy.py").write_text(LAZY)
    (pkg / "ops/swiglu/nan.py").write_text(NAN)
    (pkg / "ops/swiglu/crash.py").write_text(CRASH)
    return root


@pytest.fixture(scope="module")
def engine_ops(engine):
    return describe(engine)


def _check(engine, engine_ops, impl: str, **values):
    return check_candidate(engine, Candidate(op="swiglu", impl=impl, values=values), preset="tiny", options=OPTIONS,
                           engine_ops=engine_ops)


def test_a_correct_candidate_passes_with_the_harness_timing(engine, engine_ops):
    r = _check(engine, engine_ops, "triton_fused", block=512, num_warps=2)
    assert r.verdict == "passed", r.message
    assert r.values_used == {"block": 512, "num_warps": 2}  # what the engine's op launched with
    assert [s["shape"] for s in r.shapes] == ["production 1x8", "edge 1x1", "edge 3x5"]
    assert all(s["error"] is None and s["max_rel_err"] < 1e-4 and s["seed"] >= 0 for s in r.shapes)
    t = r.timing
    assert t["clock"] == "perf_counter" and t["median_ms"] > 0 and t["reps"] == 2 and t["gbps"] > 0
    assert t["roofline_pct"] is None  # no CPU peaks given
    assert r.runtime["device"] == "cpu"


def test_a_launch_config_that_skips_columns_fails(engine, engine_ops):
    r = _check(engine, engine_ops, "triton_fused", block=256)
    assert r.verdict == "failed" and r.ms is None
    assert "non-finite" in r.message or "relative error" in r.message, r.message


@pytest.mark.parametrize("impl", ["lazy", "nan"])
def test_unwritten_outputs_and_nans_fail(engine, engine_ops, impl):
    r = _check(engine, engine_ops, impl)
    assert r.verdict == "failed", r.message
    assert "non-finite values where the reference's are finite" in r.message or "relative error" in r.message


def test_a_crash_says_at_which_shape_and_keeps_the_shapes_before_it(engine, engine_ops):
    r = _check(engine, engine_ops, "crash")
    assert r.verdict == "failed" and r.message.startswith("edge 3x5: ValueError: stride not divisible by 8"), r.message
    assert [s["shape"] for s in r.shapes] == ["production 1x8", "edge 1x1"]
    assert all(s["error"] is None for s in r.shapes)


def test_seeds_are_fresh(engine, engine_ops):
    a, b = (_check(engine, engine_ops, "reference") for _ in range(2))
    assert a.verdict == b.verdict == "passed"
    assert [s["seed"] for s in a.shapes] != [s["seed"] for s in b.shapes]


@pytest.mark.parametrize("candidate, message", [
    (Candidate(op="swigluu", impl="triton_fused"), "unknown op 'swigluu'"),
    (Candidate(op="swiglu", impl="cutlass"), "unknown implementation 'cutlass'"),
    (Candidate(op="swiglu", impl="triton_fused", values={"block_size": 64}), "unknown parameter 'block_size'"),
    (Candidate(op="swiglu", impl="triton_fused", values={"block": 100}), "block=100 is outside the declared domain"),
    (Candidate(op="swiglu", impl="triton_fused", values={"num_warps": True}), "num_warps=True is outside the declared"),
])  # fmt: skip
def test_unknown_names_are_errors(engine, engine_ops, candidate, message):
    with pytest.raises(OpSpecError, match=message):
        check_candidate(engine, candidate, preset="tiny", options=OPTIONS, engine_ops=engine_ops)


def test_the_leaderboard_keeps_every_candidate(engine, engine_ops, tmp_path):
    export = tmp_path / "export"
    good = _check(engine, engine_ops, "triton_fused", block=1024)
    bad = _check(engine, engine_ops, "triton_fused", block=256)
    record(export, good, options=OPTIONS, source="round 1")
    record(export, bad, options=OPTIONS, source="round 2")
    again = _check(engine, engine_ops, "triton_fused", block=1024)
    board = record(export, again, options=OPTIONS, source="round 3")
    assert json.loads(leaderboard_path(export, "swiglu").read_text()) == json.loads(json.dumps(board, default=str))
    rows = board["entries"]
    assert [(r["values"], r["verdict"], r["source"]) for r in rows] == [({"block": 1024}, "passed", "round 3"),
                                                                      ({"block": 256}, "failed", "round 2")]
    assert board["best"]["values"] == {"block": 1024} and board["best"]["ms"] == again.ms
    assert board["hardware"]["device"] == "cpu" and board["versions"]["torch"] and board["harness"]["reps"] == 2


def test_the_error_is_the_max_over_finite_elements_chunk_by_chunk(monkeypatch):
    """child._rel compares in float64 chunks (a production CE gradient has 2.4 G elements): the same number as one
    pass over the finite elements, however the chunks fall; NaN or inf only where the reference has them."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "gates" / "ops" / "child.py"
    spec = importlib.util.spec_from_file_location("op_child", path)
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    want = torch.randn(5, 13).to(torch.bfloat16)
    got = (want.float() + 1e-2 * torch.randn(5, 13)).to(torch.bfloat16)
    for t in (want, got):
        t[1, 2], t[3, 3] = float("inf"), float("nan")
    finite = torch.isfinite(want)
    whole = (got[finite].double() - want[finite].double()).abs().max() / want[finite].double().abs().max()
    for chunk in (1, 7, 64, 1 << 26):
        monkeypatch.setattr(child, "_CHUNK", chunk)
        assert child._rel(got, want) == pytest.approx(whole.item(), rel=1e-12)
        assert child._check([got], [want], 0.1) == (pytest.approx(whole.item(), rel=1e-12), None)
    got[0, 0] = float("nan")
    assert "NaN never passes" in child._check([got], [want], 0.1)[1]


def test_a_shape_the_implementation_cannot_run_is_unsupported_not_passed(engine, engine_ops):
    r = _check(engine, engine_ops, "no_1x1")
    assert r.verdict == "passed", r.message
    assert [c.get("unsupported") for c in r.shapes] == [None, "not one token", None]
    assert r.shapes[2]["error"] is None and r.shapes[2]["max_rel_err"] <= 1e-6
    prod = _check(engine, engine_ops, "no_prod")
    assert prod.verdict == "failed" and "not 8 tokens" in prod.message and prod.timing is None
    edges = _check(engine, engine_ops, "no_edges")
    assert edges.verdict == "failed" and "none of the edge shapes" in edges.message


def test_half_precision_beyond_the_bound_passes_only_as_close_to_float32_as_the_reference():
    from gates.ops import child

    gen = torch.Generator().manual_seed(5)
    exact = torch.randn(4096, generator=gen)
    noise = torch.randn(4096, generator=gen)
    want = (exact + 0.05 * noise).bfloat16()  # the bf16 reference: ~5 % of max off its float32 twin
    near = (exact - 0.06 * noise).bfloat16()  # ~11 % off the reference, ~6 % off the twin
    far = (exact + 0.2 * torch.randn(4096, generator=gen)).bfloat16()
    assert child._check([near], [want], child.TOLERANCE["bfloat16"])[1] is not None
    bound = child.TOLERANCE["bfloat16"]
    why, rows = child._check_by_twin([near], [want], [exact], bound)
    assert why is None and rows[0]["rel_err_vs_float32"] < 2 * rows[0]["reference_rel_err_vs_float32"]
    why, _ = child._check_by_twin([far], [want], [exact], bound)
    assert why is not None and "float32 twin" in why
    # an output within the bound of the reference's passes as it did, however exact the reference is
    loss, loss_ref = torch.tensor([2.0001]), torch.tensor([2.0])
    why, rows = child._check_by_twin([loss, near], [loss_ref, want], [loss_ref, exact], bound)
    assert why is None and [r["output"] for r in rows] == [1]
