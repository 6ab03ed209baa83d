"""The op registry: the config selects implementations, the model calls every op through it, and
bad selections fail naming the op."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.core.optim import AdamW
from train_engine_0_5b.minicpm.init import init_weights
from train_engine_0_5b.model import build_model, load_weights
from train_engine_0_5b.model_config import preset
from train_engine_0_5b.ops import registry
from train_engine_0_5b.ops.cases import Dims
from train_engine_0_5b.ops.registry import OPS, OpSelection, resolve


def test_device_defaults():
    cpu, cuda = resolve(OpSelection(), "cpu").names, resolve(OpSelection(), "cuda").names
    assert set(cpu.values()) == {"reference", "unfused"} and cpu["mlp"] == "unfused"
    fastest_adamw = "triton_fused" if "triton_fused" in OPS["adamw"] else "foreach"  # first registered preference
    fastest_attention = "flash4" if "flash4" in OPS["attention"] else "sdpa"
    assert cuda["attention"] == fastest_attention and cuda["adamw"] == fastest_adamw
    fused_qkv = "triton_fused" if "triton_fused" in OPS["qkv_rope"] else "unfused"
    assert cuda["qkv_rope"] == fused_qkv and cpu["qkv_rope"] == "unfused"
    assert cuda["gemm.qkv"] == ("(in qkv_rope=triton_fused)" if fused_qkv == "triton_fused" else "reference")
    assert cuda["mlp"] == next((n for n in ("quack_dgated", "quack_gated") if n in OPS["mlp"]), "unfused")
    assert cuda["residual_scale"] == "weight" and cpu["residual_scale"] == "reference"
    fused_output = next((n for n in ("quack_triton", "triton_fused") if n in OPS["linear_cross_entropy"]), "unfused")
    assert cuda["linear_cross_entropy"] == fused_output and cpu["linear_cross_entropy"] == "unfused"
    chosen = resolve(OpSelection.parse("attention=reference,gemm=concat,gemm.output=reference,linear_cross_entropy=unfused,"
                                       "mlp=unfused"), "cuda").names  # the fc1 site is a GEMM only when mlp is unfused
    assert chosen["attention"] == "reference" and chosen["gemm.fc1"] == "concat" and chosen["gemm.output"] == "reference"
    assert resolve(OpSelection.parse("gemm.qkv=concat"), "cpu").gemm_qkv is OPS["gemm"]["concat"]


def test_auto_skips_implementations_that_cannot_run_the_dtype(monkeypatch):
    """FA4 is bf16/fp16 only: auto picks it for bf16 and falls to SDPA for fp32 (an fp32 GPU gate case)."""
    monkeypatch.setitem(OPS["attention"], "flash4", OPS["attention"]["sdpa"])  # registered, as on an H100
    assert resolve(OpSelection(), "cuda", torch.bfloat16).names["attention"] == "flash4"
    assert resolve(OpSelection(), "cuda", torch.float32).names["attention"] == "sdpa"
    assert resolve(OpSelection(attention="flash4"), "cuda", torch.float32).names["attention"] == "flash4"  # explicit


@pytest.mark.parametrize("op,impl,fallback", [("mlp", "quack_dgated", "unfused"), ("mlp", "quack_gated", "unfused"),
                                               ("linear_cross_entropy", "quack_triton", None)])
def test_auto_quack_ops_in_half_precision_only(monkeypatch, op, impl, fallback):
    """Each quack op is auto's pick for bf16 on CUDA when registered (as on an H100) and the ones before it in
    the preference are not; fp32 falls past every quack op."""
    for name in ("quack_dgated", "quack_gated", "quack_triton"):
        monkeypatch.delitem(OPS.get(op, {}), name, raising=False)
    monkeypatch.setitem(OPS[op], impl, OPS[op]["reference"])
    bf16 = resolve(OpSelection(), "cuda", torch.bfloat16).names
    assert bf16[op] == impl
    if op == "mlp":
        assert bf16["gemm.fc1"] == f"(in mlp={impl})"
    fp32 = resolve(OpSelection(), "cuda", torch.float32).names[op]
    assert fp32 == (fallback or next((n for n in ("triton_fused",) if n in OPS[op]), "unfused"))
    assert resolve(OpSelection(), "cpu", torch.bfloat16).names[op] == "unfused"


def test_auto_skips_implementations_that_cannot_run_the_models_shapes(monkeypatch):
    """quack_triton declares hidden size and vocabulary multiples of 8: with a vocabulary of 50257 (GPT-2's) auto
    takes the next CUDA default, and naming it is an error at resolution, before any step."""
    monkeypatch.setitem(OPS["linear_cross_entropy"], "quack_triton", OPS["linear_cross_entropy"]["reference"])
    monkeypatch.setitem(OPS["linear_cross_entropy"], "triton_fused", OPS["linear_cross_entropy"]["reference"])
    minicpm, odd = (Dims.of_model(preset("minicpm4-0.5b").model_copy(update={"vocab_size": v}), 2, 64)
                    for v in (73448, 50257))
    pick = lambda dims: resolve(OpSelection(), "cuda", torch.bfloat16, dims=dims).names["linear_cross_entropy"]  # noqa: E731
    assert pick(minicpm) == pick(None) == "quack_triton"
    assert pick(odd) == "triton_fused"
    with pytest.raises(EngineError, match=r"ops.linear_cross_entropy: quack_triton cannot run this model: .*50257"):
        resolve(OpSelection(linear_cross_entropy="quack_triton"), "cuda", torch.bfloat16, dims=odd)


def test_fused_mlp_selection_is_logged_for_the_ops_it_replaces():
    names = resolve(OpSelection(mlp="reference"), "cpu").names
    assert names["mlp"] == "reference"
    assert names["gemm.fc1"] == names["swiglu"] == names["gemm.fc2"] == "(in mlp=reference)"
    with pytest.raises(EngineError, match=r"ops.mlp: unknown implementation 'fast'; registered: .*reference.*unfused"):
        resolve(OpSelection(mlp="fast"), "cpu")
    names = resolve(OpSelection.parse("linear_cross_entropy=reference"), "cpu").names
    assert names["gemm.output"] == names["cross_entropy"] == "(in linear_cross_entropy=reference)"
    assert resolve(OpSelection(), "cpu").linear_cross_entropy is None  # unfused unless chosen
    names = resolve(OpSelection.parse("qkv_rope=reference"), "cpu").names
    assert names["gemm.qkv"] == names["rope"] == "(in qkv_rope=reference)" and names["gemm.attn_out"] == "reference"
    assert resolve(OpSelection(), "cpu").qkv_rope is None


def test_bad_selections_name_the_op():
    with pytest.raises(EngineError, match=r"ops.rope: unknown implementation 'cutlass'; registered: reference"):
        resolve(OpSelection(rope="cutlass"), "cpu")
    with pytest.raises(EngineError, match="--ops"):
        OpSelection.parse("attention")
    with pytest.raises(EngineError, match="--ops"):
        OpSelection.parse("flash=on")  # not an op
    registry.UNAVAILABLE[("rope", "missing_kernel")] = "ModuleNotFoundError: No module named 'triton'"
    try:
        with pytest.raises(EngineError, match="ops.rope: implementation 'missing_kernel' is unavailable .*triton"):
            resolve(OpSelection(rope="missing_kernel"), "cpu")
    finally:
        del registry.UNAVAILABLE[("rope", "missing_kernel")]


@pytest.mark.parametrize("fused", ["unfused", "spy"])
def test_every_op_is_called_through_the_registry(monkeypatch, fused):
    """Register a counting wrapper of each reference op as implementation "spy", select it everywhere,
    run forward + backward + an AdamW step: every op is counted as often as the model has sites, and
    the result is bitwise the reference selection's. A fused mlp replaces the fc1 / fc2 GEMMs and swiglu;
    a fused linear_cross_entropy replaces the output GEMM and cross_entropy; a fused qkv_rope the qkv GEMM and rope.
    residual_scale's reference is no call (add_rms_norm applies r): tests/ops/test_residual_scale_weight.py."""
    calls: Counter = Counter()
    for op, impls in OPS.items():
        if impls["reference"] is None:  # residual_scale: nothing to count
            continue

        def spy(*args, _op=op, _fn=impls["reference"], **kwargs):
            calls[_op] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(impls, "spy", spy)
    fusions = ("mlp", "linear_cross_entropy", "qkv_rope")
    spied = [op for op in OPS if op not in fusions and OPS[op]["reference"] is not None]
    spy_sel = OpSelection.parse(",".join(f"{op}=spy" for op in spied) + "".join(f",{op}={fused}" for op in fusions))
    cfg = preset("tiny")
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = torch.randint(0, cfg.vocab_size, (2, 12))
    results = []
    for sel in (spy_sel, OpSelection()):
        ops = resolve(sel, "cpu")
        model = build_model(cfg, ops, "cpu", torch.float32)
        weights = init_weights(model.cfg, 0.1, seed=7)
        load_weights(model, weights)
        opt = AdamW(dict(model.named_parameters()), weights, adamw_op=ops.adamw, betas=(0.9, 0.95), eps=1e-8,
                    weight_decay=0.1, master_dtype=torch.float32)
        loss = model.loss_sum(ids, labels)
        loss.backward()
        opt.step([p.grad for p in model.parameters()], lr=1e-3, max_norm=0.0)
        results.append((loss.detach(), [p.detach().clone() for p in model.parameters()]))
    L = cfg.num_layers
    if fused == "unfused":  # qkv, fc1, fc2 per layer; the output GEMM
        fused_calls = dict(gemm=3 * L + 1, rope=L, swiglu=L, cross_entropy=1)
    else:
        fused_calls = dict(qkv_rope=L, mlp=L, linear_cross_entropy=1)
    assert calls == Counter(attention=L, gemm=L, rms_norm=1, add_rms_norm=2 * L, adamw=1) + Counter(fused_calls)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's grid and meta-parameters, launches nothing."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, meta))


def _tuned_file(tmp_path, monkeypatch, ops: dict, key: dict | None = None):
    from train_engine_0_5b.ops import space

    key = key or space.runtime_key("cpu").model_dump()
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"entries": [{"key": key, "ops": ops, "note": "test"}]}))
    monkeypatch.setattr(space, "TUNED_FILE", path)


@pytest.mark.parametrize("block, warps", [(256, 2), (2048, 8)])
def test_the_tuned_file_reaches_the_kernel_launch(tmp_path, monkeypatch, block, warps):
    """An entry for this runtime's key sets swiglu=triton_fused's block and warps: resolve records them and the
    kernel launches with them (ignore the file and the launch has the declared 1024 / 4)."""
    pytest.importorskip("triton")
    from train_engine_0_5b.ops.swiglu import triton_fused

    _tuned_file(tmp_path, monkeypatch, {"swiglu": {"triton_fused": {"block": block, "num_warps": warps}}})
    ops = resolve(OpSelection(swiglu="triton_fused"), "cpu")
    assert ops.names["swiglu"] == "triton_fused" and ops.tuned == {"swiglu=triton_fused": {"block": block, "num_warps": warps}}
    spy = _LaunchSpy()
    monkeypatch.setattr(triton_fused, "_swiglu_fwd_kernel", spy)
    gate, up = torch.randn(3, 5, 3000), torch.randn(3, 5, 3000)
    triton_fused.swiglu_fwd(gate, up)
    (grid, meta), = spy.launches
    assert meta == {"BLOCK": block, "num_warps": warps} and grid == (15 * -(-3000 // block),)


def test_an_entry_for_another_runtime_runs_the_defaults(tmp_path, monkeypatch):
    from train_engine_0_5b.ops import space

    other = space.runtime_key("cpu").model_dump() | {"torch": "0.0.1"}
    _tuned_file(tmp_path, monkeypatch, {"swiglu": {"triton_fused": {"block": 256}}}, key=other)
    if "triton_fused" not in OPS["swiglu"]:
        pytest.skip("triton is not installed")
    ops = resolve(OpSelection(swiglu="triton_fused"), "cpu")
    assert ops.tuned == {"swiglu=triton_fused": {"block": 1024, "num_warps": 4}}
    assert space.value("swiglu", "triton_fused", "block") == 1024


@pytest.mark.parametrize("ops, message", [
    ({"rmsnorm": {"triton_fused": {"num_warps": 4}}}, "unknown op 'rmsnorm'"),
    ({"rms_norm": {"cutlass": {}}}, "ops.rms_norm: unknown implementation 'cutlass'"),
    ({"swiglu": {"triton_fused": {"block_size": 64}}}, "unknown parameter 'block_size'"),
    ({"swiglu": {"triton_fused": {"block": 100}}}, "block=100 is outside the declared domain"),
])  # fmt: skip
def test_a_tuned_file_with_unknown_names_is_an_error(tmp_path, monkeypatch, ops, message):
    _tuned_file(tmp_path, monkeypatch, ops)
    with pytest.raises(EngineError, match=message):
        resolve(OpSelection(), "cpu")
    with pytest.raises(EngineError, match=message):  # the same check for values handed in directly
        resolve(OpSelection(), "cpu", tuned=ops)


def test_auto_is_recorded_as_what_ran_in_the_log_header_and_the_checkpoint(cli, tmp_path):
    from engine_testlib import TINY

    res = cli(["pretrain", *TINY, "--num-steps", "1", "--global-batch-size", "2", "--micro-batch-size", "2",
               "--save-dir", tmp_path / "ckpt", "--ops", "swiglu=reference"])
    assert res.exit_code == 0, res.output + res.stderr
    state = json.loads(next((tmp_path / "ckpt").glob("step_*/state.json")).read_text())
    names = state["ops"]["names"]
    assert "auto" not in names.values() and names == resolve(OpSelection(), "cpu").names
    assert state["ops"]["tuned_key"]["device"] == "cpu" and state["config"]["ops"]["attention"] == "auto"
    assert "'names': {'attention': 'reference'" in res.output and "'tuned_key'" in res.output
