"""The engine's probe answers against the workspace's torch reference on the tiny case (CPU, fp32).

Bound: every tensor within rel 1e-5 (max |engine - reference| / max |reference|), i.e. fp32 rounding.
With the reference implementations of every op (the CPU defaults) the engine runs the same kernels in
the same order, so its answers are also bitwise equal; the second test holds it to that.
The alternative implementations (SDPA, concatenated GEMMs, foreach AdamW, the residual scale on the
weights) round in another order: the same 1e-5 bound holds for logits, losses, gradients and norms;
weights after AdamW steps are held by engine_testlib.assert_adamw_weights_close (why no fixed max bound
fits is there). foreach AdamW itself is held to the reference on identical gradients in
tests/ops/test_adamw_foreach.py.
"""

from __future__ import annotations

import pytest
import torch
from engine_testlib import assert_adamw_weights_close, rel_err

from gates.case import hf_param_shapes, load_case, make_spec, new_case
from gates.probe import EXIT_UNSUPPORTED, REFERENCE_NAMES, expected_names, read_outputs, write_outputs
from gates.stacks.torch_ref.probes import run_probe as reference_probe
from train_engine_0_5b.ops.registry import OpSelection
from train_engine_0_5b.probe import run_probe

REL_TOL = 1e-5
PROBES = ("forward", "backward", "steps", "checkpoint")
# Non-default implementations that must still agree within fp32 rounding (not bitwise).
ALTERNATIVES = "attention=sdpa,gemm=concat,adamw=foreach,residual_scale=weight"


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """Reference and engine outputs for each probe on one fresh tiny case (DP=2 layout, 2 micro batches,
    ignored labels), plus the engine with the alternative implementations."""
    root = tmp_path_factory.mktemp("probes")
    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # fresh inputs each run
    spec = make_spec("tiny", steps=3, world_size=2, micro_batch_size=1, grad_accum=2, seq_length=16, seed=seed,
                     schedule={"kind": "cosine", "warmup_steps": 2}, optimizer={"lr": 3e-3, "grad_clip": 0.5})
    case_dir = new_case(root / "case", spec)
    case = load_case(case_dir)
    out = {}
    for name in PROBES:
        ref_dir = root / "ref" / name
        tensors, metrics = reference_probe(name, case, ref_dir)
        write_outputs(ref_dir, tensors, metrics)
        ref = read_outputs(ref_dir)[0]
        for extra in REFERENCE_NAMES:  # steps and checkpoint only
            ref.pop(extra, None)  # per-rank answers: tests/engines/test_engine_dp.py checks the engine's
        out[name] = {"ref": ref}
        for label, ops in (("engine", ""), ("alternatives", ALTERNATIVES)):
            if label == "alternatives" and name not in ("backward", "steps"):
                continue  # forward is inside backward; checkpoint adds nothing op-specific
            eng_dir = root / label / name
            run_probe(name, case_dir, eng_dir, OpSelection.parse(ops))
            out[name][label] = read_outputs(eng_dir)
        out[name]["dir"] = root / "engine" / name
    return spec, out


@pytest.mark.parametrize("probe", PROBES)
def test_probe_matches_reference_within_fp32_rounding(answers, probe):
    spec, out = answers
    ref = out[probe]["ref"]
    eng, metrics = out[probe]["engine"]
    assert set(eng) == set(ref) == expected_names(probe, list(hf_param_shapes(spec.model)), spec.model.num_layers)
    for name, r in ref.items():
        assert eng[name].shape == r.shape and eng[name].dtype == r.dtype, name
        assert torch.isfinite(eng[name]).all(), name
        assert rel_err(r, eng[name]) <= REL_TOL, (probe, name, rel_err(r, eng[name]))
    assert metrics["probe"] == probe and metrics["stack"] == "train_engine_0_5b"


@pytest.mark.parametrize("probe", PROBES)
def test_reference_ops_are_bitwise_equal_to_the_reference(answers, probe):
    _, out = answers
    ref, (eng, _) = out[probe]["ref"], out[probe]["engine"]
    differing = [n for n in ref if not torch.equal(ref[n], eng[n])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("probe", ["backward", "steps"])
def test_alternative_implementations_match_within_fp32_rounding(answers, probe):
    _, out = answers
    ref, (alt, metrics) = out[probe]["ref"], out[probe]["alternatives"]
    assert metrics["ops"]["attention"] == "sdpa" and metrics["ops"]["gemm.qkv"] == "concat"
    assert metrics["ops"]["adamw"] == "foreach" and metrics["ops"]["residual_scale"] == "weight"
    weights = [n for n in ref if n.startswith("weight.")]
    for name in set(ref) - set(weights):
        assert rel_err(ref[name], alt[name]) <= REL_TOL, (probe, name, rel_err(ref[name], alt[name]))
    assert (probe == "steps") == bool(weights)
    if weights:
        assert_adamw_weights_close({n: ref[n] for n in weights}, {n: alt[n] for n in weights},
                                   lrs=ref["lrs"], tol=REL_TOL)


def test_checkpoint_probe_resumes_bitwise_and_exports(answers, cli, tmp_path):
    spec, out = answers
    # The checkpoint probe resumed from disk and still equals the straight run.
    steps, resumed = out["steps"]["engine"][0], out["checkpoint"]["engine"][0]
    assert all(torch.equal(steps[n], resumed[n]) for n in steps)
    # Its checkpoint is a real one: export-hf turns it into a checkpoint transformers loads (gate M6).
    transformers = pytest.importorskip("transformers")
    res = cli(["export-hf", "--checkpoint", out["checkpoint"]["dir"] / "ckpt", "--out", tmp_path / "hf"])
    assert res.exit_code == 0, res.output + res.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert model.config.vocab_size == spec.model.vocab_size
    assert len(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))) <= spec.model.vocab_size


def test_unknown_probe_and_unknown_case_field_exit_77(cli, tmp_path):
    spec = make_spec("tiny", steps=1, seq_length=8)
    case_dir = new_case(tmp_path / "case", spec)
    res = cli(["probe", "activations", "--case", case_dir, "--out", tmp_path / "o"])
    assert res.exit_code == EXIT_UNSUPPORTED and "unknown probe" in res.stderr
    text = (case_dir / "case.json").read_text().replace('"seed"', '"pipeline_parallel": 2, "seed"')
    (case_dir / "case.json").write_text(text)
    res = cli(["probe", "forward", "--case", case_dir, "--out", tmp_path / "o"])
    assert res.exit_code == EXIT_UNSUPPORTED and "pipeline_parallel" in res.stderr
    assert not (tmp_path / "o").exists()


def test_adamw_weight_bound_rejects_broad_and_gross_errors():
    """The weight bound used above can fail: a small error on many elements, or one element off by a
    large share of the total step, is rejected; one element off by rounding-sized noise is not."""
    ref = {"w": torch.randn(64, 64) * 0.02}
    lrs = [2e-3, 3e-3, 2e-3]  # step cap: a quarter of 7e-3
    lr_total = sum(lrs)
    near = ref["w"].clone()
    near.view(-1)[5] += 0.01 * lr_total  # a near-cancelling gradient's element: allowed
    assert_adamw_weights_close(ref, {"w": near}, lrs=lrs)
    broad = ref["w"] * (1 + 1e-3)  # every element 1e-3 off: a real difference
    with pytest.raises(AssertionError, match="of elements within"):
        assert_adamw_weights_close(ref, {"w": broad}, lrs=lrs)
    gross = ref["w"].clone()
    gross.view(-1)[7] -= 0.5 * lr_total
    with pytest.raises(AssertionError):
        assert_adamw_weights_close(ref, {"w": gross}, lrs=lrs)
    poisoned = ref["w"].clone()
    poisoned.view(-1)[3] = float("nan")
    with pytest.raises(AssertionError):
        assert_adamw_weights_close(ref, {"w": poisoned}, lrs=lrs)
