"""The agreement report's comparison: relative errors, the bf16-noise bound, and a run end to end on the
CPU (tiny model, the torch stack as its own candidate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.agreement import FACTOR, FP32_REL, compare_fp32, compare_probe, rel_err, summarize

REPO = Path(__file__).resolve().parents[2]


def test_rel_err() -> None:
    b = torch.randn(50, dtype=torch.float64)
    assert rel_err(b, b) == 0.0
    assert rel_err(b * 1.01, b) == pytest.approx(0.01)
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    with pytest.raises(ValueError):
        rel_err(torch.zeros(3), torch.zeros(4))


def _write(d: Path, tensors: dict) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "tensors.safetensors"))
    return d


def test_bound_is_relative_to_bf16_noise(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    truth = {"hidden_states.0": torch.randn(4, 8, generator=g), "logits": torch.randn(4, 8, generator=g)}
    noise = {k: v + 0.01 * torch.randn(v.shape, generator=g) * v.norm() / v.numel() ** 0.5 for k, v in truth.items()}
    close = {k: v + 0.012 * torch.randn(v.shape, generator=g) * v.norm() / v.numel() ** 0.5 for k, v in truth.items()}
    broken = dict(close, logits=truth["logits"] * 1.4)  # a missing scale, say
    r32, r16 = _write(tmp_path / "r32", truth), _write(tmp_path / "r16", noise)
    rows = compare_probe(_write(tmp_path / "ok", close), r16, r32, "forward")
    assert all(r["agree"] for r in rows) and summarize(rows)["agree"]
    rows = compare_probe(_write(tmp_path / "bad", broken), r16, r32, "forward")
    by = {r["tensor"]: r for r in rows}
    assert not by["logits"]["agree"] and by["hidden_states.0"]["agree"]
    assert by["logits"]["bound"] == pytest.approx(FACTOR * by["logits"]["torch_bf16_vs_fp32"])
    assert summarize(rows)["failing"] == ["logits"]
    rows = compare_probe(_write(tmp_path / "partial", {"logits": close["logits"]}), r16, r32, "forward")
    assert not summarize(rows)["agree"]


def test_fp32_rows_use_the_fp32_gate_bound(tmp_path) -> None:
    """Summation-order noise (1e-7) agrees; a skipped weight decay on one matrix (lr * wd = 1e-4 relative per
    step) does not, although it would hide under bf16 noise."""
    g = torch.Generator().manual_seed(1)
    truth = {"weight.a": torch.randn(64, 64, generator=g), "grad_norms": torch.rand(3, generator=g) + 0.5}
    reordered = {k: v * (1 + 1e-7 * torch.randn(v.shape, generator=g)) for k, v in truth.items()}
    no_decay = dict(reordered, **{"weight.a": truth["weight.a"] * (1 + 1e-4)})
    ref = _write(tmp_path / "ref", truth)
    rows = compare_fp32(_write(tmp_path / "ok", reordered), ref)
    assert summarize(rows)["agree"] and all(r["bound"] == FP32_REL for r in rows)
    rows = compare_fp32(_write(tmp_path / "bad", no_decay), ref)
    assert summarize(rows)["failing"] == ["weight.a"]
    rows = compare_fp32(_write(tmp_path / "partial", {"weight.a": truth["weight.a"]}), ref)
    assert summarize(rows)["failing"] == ["grad_norms"]


def test_end_to_end_on_cpu(tmp_path) -> None:
    out = tmp_path / "agr"
    r = subprocess.run([sys.executable, "-m", "benchmarks.agreement", "--model", "tiny", "--seq-length", "16",
                        "--steps", "2", "--device", "cpu", "--stacks", "torch", "--probes", "forward", "--fp32-probes", "forward", "--out", str(out)],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "agreement.json").read_text())
    fwd = doc["stacks"]["torch"]["forward"]
    assert doc["agree"] and fwd["summary"]["tensors"] == 2 + 3  # logits, loss, hidden_states.0..2
    assert fwd["summary"]["max_vs_torch_bf16"] == 0.0  # the candidate is the bf16 reference itself
    assert 0 < fwd["summary"]["max_vs_torch_fp32"] < 0.05  # and bf16 costs something vs fp32
    assert "| forward | ok | 5 | yes |" in (out / "agreement.md").read_text()
    fp32 = doc["stacks"]["torch"]["forward@fp32"]["summary"]  # the fp32 case, torch against itself
    assert fp32["agree"] and fp32["tensors"] == 5 and fp32["max_vs_torch_fp32"] == 0.0
