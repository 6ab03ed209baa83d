"""The reference stack answers the probe contract as a subprocess, deterministically."""

import subprocess
import sys

import pytest
import torch

from gates.case import hf_param_shapes, load_case, make_spec, new_case
from gates.probe import EXIT_UNSUPPORTED, REFERENCE_NAMES, REFERENCE_RANK_SUMS, expected_names, read_outputs

REF = [sys.executable, "-m", "gates.stacks.torch_ref"]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("case")
    new_case(d, make_spec("tiny", steps=4, world_size=2, micro_batch_size=2, grad_accum=2, seq_length=12, seed=7))
    return d


def _probe(name, case_dir, out):
    subprocess.run([*REF, "probe", name, "--case", str(case_dir), "--out", str(out)], check=True, capture_output=True)
    return read_outputs(out)


@pytest.mark.parametrize("name", ["forward", "backward", "steps", "checkpoint"])
def test_probe_round_trip(case_dir, tmp_path, name):
    case = load_case(case_dir)
    cfg, spec = case.spec.model, case.spec
    tensors, metrics = _probe(name, case_dir, tmp_path / "a")
    params = list(hf_param_shapes(cfg))
    extra = set(REFERENCE_NAMES) if name in ("steps", "checkpoint") else set()  # each rank's share (M4), the fp64 norms
    assert set(tensors) == expected_names(name, params, cfg.num_layers) | extra
    assert metrics["probe"] == name and metrics["stack"] == "torch"
    for k, t in tensors.items():
        assert torch.isfinite(t).all(), k
    rows = spec.global_batch_rows
    if name == "forward":
        assert tensors["logits"].shape == (rows, spec.seq_length, cfg.vocab_size)
        assert tensors["hidden_states.0"].shape == (rows, spec.seq_length, cfg.hidden_size)
    if name == "backward":
        for p, shape in hf_param_shapes(cfg).items():
            assert tensors[f"grad.{p}"].shape == shape
            assert tensors[f"grad.{p}"].abs().sum() > 0, p
    if name in ("steps", "checkpoint"):
        assert tensors["losses"].shape == (spec.steps,)
        moved = tensors["weight.model.layers.0.mlp.up_proj.weight"] - case.weights["model.layers.0.mlp.up_proj.weight"]
        assert moved.abs().max() > 0
        sums = tensors[REFERENCE_RANK_SUMS]  # (steps, world): summed over ranks, the steps' loss times their tokens
        counts = (case.batches["labels"] != -100).sum(dim=(1, 2, 3))
        torch.testing.assert_close(sums.sum(1) / counts, tensors["losses"].double(), rtol=1e-6, atol=0)
    again, _ = _probe(name, case_dir, tmp_path / "b")
    for k in tensors:
        assert torch.equal(tensors[k], again[k]), f"{k} differs between two identical runs"


def test_checkpoint_equals_steps(case_dir, tmp_path):
    a, _ = _probe("steps", case_dir, tmp_path / "s")
    b, _ = _probe("checkpoint", case_dir, tmp_path / "c")
    assert (tmp_path / "c" / "ckpt" / "state.safetensors").is_file()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_unknown_probe_is_unsupported(case_dir, tmp_path):
    r = subprocess.run([*REF, "probe", "telepathy", "--case", str(case_dir), "--out", str(tmp_path)], capture_output=True)
    assert r.returncode == EXIT_UNSUPPORTED


def test_missing_case_is_an_error(tmp_path):
    r = subprocess.run([*REF, "probe", "forward", "--case", str(tmp_path / "nope"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "missing case.json" in r.stderr
