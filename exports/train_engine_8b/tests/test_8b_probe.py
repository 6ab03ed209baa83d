"""`probe forward|backward|steps|checkpoint` (the probe contract, core/probe.py) on the reduced 8B: in this process
at TP=1 (default tier) and under torchrun at TP=2 over gloo against TP=1 (slow), on float64 cases.

TP=2 answers are whole tensors (gathered): logits, the residual stream after every layer, the loss, every
gradient, the losses / grad norms / lrs and final weights after the steps; they equal TP=1's within 1e-12
relative (float64: only the order of sums differs), the final weights within 1e-8 (AdamW's g / (|g| + eps)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_engine_8b.core.probe import CaseSpec
from train_engine_8b.minicpm.init import init_weights
from train_engine_8b.model_config import preset
from train_engine_8b.probe import run_probe

SRC = Path(__file__).resolve().parents[1] / "src"


def make_case(d: Path, seed: int, world_size: int = 1, steps: int = 3) -> Path:
    """A float64 case of the reduced 8B: fresh weights (norms perturbed), batches with pad tokens and ignored labels."""
    cfg = preset("minicpm4-8b-reduced")
    spec = CaseSpec(model=cfg, dtype="float64", world_size=world_size, micro_batch_size=2, grad_accum=1,
                    seq_length=16, steps=steps, seed=seed)
    d.mkdir(parents=True)
    (d / "case.json").write_text(spec.model_dump_json(indent=1))
    gen = torch.Generator().manual_seed(seed)
    weights = {k: (v + 0.1 * torch.randn(v.shape, generator=gen) if v.ndim == 1 else v).double()
               for k, v in init_weights(cfg, 0.1, seed).items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "weights.safetensors"))
    shape = (steps, world_size, 2, 16)
    ids = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    ids[..., ::5] = cfg.pad_token_id
    labels = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    labels[..., :3] = -100
    save_file({"input_ids": ids, "labels": labels}, str(d / "batches.safetensors"))
    return d


def _torchrun_probe(name: str, case: Path, out: Path, nproc: int, tp: int) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                          "-m", "train_engine_8b", "probe", name, "--case", str(case), "--out", str(out), "--tp", str(tp)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_probes_in_one_process(tmp_path):
    case = make_case(tmp_path / "case", seed=int(torch.randint(0, 2**30, ())))
    fwd = load_file(str(run_probe("forward", case, tmp_path / "fwd") / "tensors.safetensors"))
    bwd = load_file(str(run_probe("backward", case, tmp_path / "bwd") / "tensors.safetensors"))
    cfg = preset("minicpm4-8b-reduced")
    assert fwd["logits"].shape == (2, 16, cfg.vocab_size) and fwd["logits"].dtype == torch.float64
    assert sorted(k for k in fwd if k.startswith("hidden_states.")) == [f"hidden_states.{i}" for i in range(cfg.num_layers + 1)]
    assert float(fwd["loss"]) == pytest.approx(float(bwd["loss"]), rel=1e-14)
    assert bwd["grad.model.embed_tokens.weight"][cfg.pad_token_id].abs().max() == 0
    metrics = json.loads((tmp_path / "fwd" / "metrics.json").read_text())
    assert metrics["stack"] == "train_engine_8b" and metrics["tp"] == 1
    # metrics.json names the registry ops this model runs, no op of the shared table it leaves unused
    assert metrics["ops"] == {"attention": "reference", "mlp": "unfused", "linear_cross_entropy": "unfused",
                              "adamw": "reference"}


def test_a_probe_runs_the_ops_it_is_asked_for_and_refuses_ops_the_engine_never_runs(tmp_path, monkeypatch):
    """--ops reaches the model (a spy MLP is called, and the fused MLP and output layer + loss equal the plain
    modules); an op outside registry_ops is an error, as in pretrain."""
    from train_engine_8b.core.errors import EngineError
    from train_engine_8b.ops.registry import OPS, OpSelection

    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return OPS["mlp"]["reference"](*args, **kwargs)

    monkeypatch.setitem(OPS["mlp"], "spy", spy)
    case = make_case(tmp_path / "case", seed=int(torch.randint(0, 2**30, ())))
    fused = OpSelection.parse("mlp=spy,linear_cross_entropy=reference")
    got = load_file(str(run_probe("backward", case, tmp_path / "fused", fused) / "tensors.safetensors"))
    assert len(calls) == preset("minicpm4-8b-reduced").num_layers  # each layer's MLP, once
    want = load_file(str(run_probe("backward", case, tmp_path / "plain") / "tensors.safetensors"))
    metrics = json.loads((tmp_path / "fused" / "metrics.json").read_text())
    assert (metrics["ops"]["mlp"], metrics["ops"]["linear_cross_entropy"]) == ("spy", "reference")
    assert got.keys() == want.keys() and all(_rel(got[k], want[k]) < 1e-12 for k in want)
    with pytest.raises(EngineError, match="rms_norm=triton_fused: train_engine_8b does not run this op"):
        run_probe("forward", case, tmp_path / "refused", OpSelection.parse("rms_norm=triton_fused"))


@pytest.mark.slow
def test_probes_at_tp2_equal_tp1(tmp_path):
    seed = int(torch.randint(0, 2**30, ()))
    case = make_case(tmp_path / "case", seed, world_size=2)
    for name in ("forward", "backward", "steps"):
        _torchrun_probe(name, case, tmp_path / f"{name}-tp2", nproc=4 if name == "steps" else 2, tp=2)
        want = load_file(str(run_probe(name, case, tmp_path / f"{name}-tp1") / "tensors.safetensors"))
        got = load_file(str(tmp_path / f"{name}-tp2" / "tensors.safetensors"))
        assert got.keys() == want.keys()
        bound = {k: 1e-8 if k.startswith("weight.") else 1e-12 for k in want}
        bad = {k: _rel(got[k], want[k]) for k in want if not _rel(got[k], want[k]) < bound[k]}
        assert not bad, f"{name}: TP=2 differs from TP=1: {bad}"
    ranks = sorted(p.name for p in (tmp_path / "steps-tp2" / "ranks").iterdir())
    assert ranks == ["rank0.safetensors", "rank1.safetensors"]  # one file per data-parallel rank (DP=2 x TP=2)


@pytest.mark.slow
def test_checkpoint_probe_at_tp2_resumes_bitwise(tmp_path):
    case = make_case(tmp_path / "case", int(torch.randint(0, 2**30, ())), steps=4)
    _torchrun_probe("checkpoint", case, tmp_path / "ck", nproc=2, tp=2)
    _torchrun_probe("steps", case, tmp_path / "st", nproc=2, tp=2)
    a, b = (load_file(str(tmp_path / d / "tensors.safetensors")) for d in ("ck", "st"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
