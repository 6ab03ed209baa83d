"""The `torch-sdpa` stack (M5's speed check at long sequences) is the reference's math: its forward and
gradients equal the eager reference's to fp32 rounding, with grouped-query heads, at a length that is
not a power of two; a bad --attention is refused. The reference's model holds copies of a case's weights."""

import subprocess
import sys

import pytest
import torch

from gates.case import random_weights
from gates.model_config import preset
from gates.stacks.torch_ref.model import MiniCPM, loss_sum


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_sdpa_matches_eager(kv_heads):
    cfg = preset("tiny").model_copy(update={"num_kv_heads": kv_heads, "num_layers": 3})
    weights = random_weights(cfg, seed=int(torch.randint(0, 2**30, ())), dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 97))
    labels = torch.randint(0, cfg.vocab_size, (2, 97))
    out = {}
    for impl in ("eager", "sdpa"):
        m = MiniCPM(cfg, impl)
        m.load_state_dict(weights)
        logits = m(ids)
        total, count = loss_sum(logits, labels)
        (total / count).backward()
        out[impl] = (logits.detach(), {n: p.grad for n, p in m.named_parameters()})
    (le, ge), (ls, gs) = out["eager"], out["sdpa"]
    assert float((ls - le).norm() / le.norm()) < 1e-6
    for n in ge:
        assert float((gs[n] - ge[n]).norm() / ge[n].norm()) < 1e-5, n


def test_bad_attention_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        MiniCPM(preset("tiny"), "flash")
    r = subprocess.run([sys.executable, "-m", "gates.stacks.torch_ref", "--attention", "flash", "info"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--attention must be one of eager, sdpa" in r.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_the_reference_model_holds_copies_of_the_case_weights(tmp_path, dtype):
    """build_model (meta construction, weights assigned): every parameter is the case's weight in the case's dtype,
    trainable, and a copy: training the model never changes the case (same dtype and device included)."""
    from gates.case import Case, make_spec, random_batches
    from gates.stacks.torch_ref.probes import build_model

    spec = make_spec("tiny", dtype=dtype)
    seed = int(torch.randint(0, 2**30, ()))
    weights = random_weights(spec.model, seed=seed, dtype=spec.master_dtype)
    case = Case(tmp_path, spec, weights, random_batches(spec, seed))
    model = build_model(case)
    params = dict(model.named_parameters())
    assert params.keys() == weights.keys()
    for name, p in params.items():
        assert p.requires_grad and p.dtype == spec.torch_dtype and p.device.type == "cpu", name
        assert torch.equal(p.detach(), weights[name].to(spec.torch_dtype)), name
        assert p.data_ptr() != weights[name].data_ptr(), name
    before = {k: v.clone() for k, v in weights.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    assert all(torch.equal(weights[k], before[k]) for k in weights)
