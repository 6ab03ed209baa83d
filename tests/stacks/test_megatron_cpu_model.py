"""The megatron stack's model and gradient path on the CPU (fp32), against the torch reference.

megatron-core's own GPTModel runs here through the test-only shims of megatron_cpu.py: the conversion
into the live model, the MiniCPM hooks and the DDP grad buffers are checked end to end; a run with the
hooks removed shows the comparison can fail. (Megatron's optimizer needs CUDA: the `steps` probe is
checked on the GPU by benchmarks/agreement.py.)
"""

from __future__ import annotations

import os

import pytest
import torch

from gates.case import load_case, make_spec, new_case
from gates.model_config import LongRope, MiniCPMConfig
from megatron_cpu import apply_cpu_shims, needs_megatron

pytestmark = needs_megatron

GQA = MiniCPMConfig(name="gqa", hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8,
                    ffn_hidden_size=96, vocab_size=257, max_seq_length=64, tie_word_embeddings=True)
UNTIED = GQA.model_copy(update={"name": "gqa-untied", "num_kv_heads": 4, "tie_word_embeddings": False})
# LongRoPE through the rotary hook: the cases' 24 positions are past original length 16 (long factors, cos/sin
# scaled by sqrt(1 + ln 4 / ln 16), the core-attention hook) or within 32 (short factors, another scale).
_FACTORS = dict(short_factor=(1.0, 1.7, 5.3, 13.0), long_factor=(1.2, 2.9, 8.1, 20.0))
LONG = GQA.model_copy(update={"name": "longrope-long", "rope_scaling": LongRope(**_FACTORS, original_max_position_embeddings=16)})
SHORT = UNTIED.model_copy(update={"name": "longrope-short", "rope_scaling": LongRope(**_FACTORS, original_max_position_embeddings=32)})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def _leave_no_process_group():
    """init_parallel sets rendezvous variables and a gloo group in this process: undo both afterwards so
    later tests (and the torchrun children they start) see the environment they had."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def shims(monkeypatch: pytest.MonkeyPatch):
    apply_cpu_shims(monkeypatch)
    yield
    torch.use_deterministic_algorithms(False)


def _case(tmp_path, cfg: MiniCPMConfig):
    spec = make_spec(cfg, steps=1, micro_batch_size=2, grad_accum=2, seq_length=24, dtype="float32", seed=7)
    return load_case(new_case(tmp_path / cfg.name, spec))


def _padded(tmp_path, cfg: MiniCPMConfig) -> MiniCPMConfig:
    """cfg with pad_token_id = a token its case feeds in (the same seed draws the same batches)."""
    return cfg.model_copy(update={"name": cfg.name + "-pad", "pad_token_id": int(_case(tmp_path, cfg).global_batch(0)[0][0, 3])})


@pytest.mark.parametrize(("cfg", "attention"), [(GQA, "unfused"), (GQA, "sdpa"), (UNTIED, "unfused"), (LONG, "unfused"),
                                                (SHORT, "sdpa"), ("pad", "unfused")],
                         ids=["gqa-unfused", "gqa-sdpa", "untied-unfused", "longrope-long", "longrope-short", "untied-pad"])
def test_forward_and_backward_match_the_reference(tmp_path, shims, cfg: MiniCPMConfig, attention: str) -> None:
    from gates.stacks.megatron.probes import run_probe as mg_probe
    from gates.stacks.torch_ref.probes import run_probe as ref_probe

    cfg = _padded(tmp_path, UNTIED) if cfg == "pad" else cfg
    case = _case(tmp_path, cfg)
    for probe in ("forward", "backward"):
        ref, _ = ref_probe(probe, case, tmp_path)
        torch.use_deterministic_algorithms(False)
        got, metrics = mg_probe(probe, case, attention, torch.device("cpu"), backend="gloo")
        assert set(got) == set(ref)
        for name in ref:
            assert _rel(got[name], ref[name]) < 2e-5, (probe, name, _rel(got[name], ref[name]))
        assert metrics["stack"] == ("megatron" if attention == "unfused" else "megatron-sdpa")


def test_without_the_minicpm_hooks_the_logits_differ(tmp_path, shims) -> None:
    from gates.stacks.megatron.model import build_gpt, causal_mask, init_parallel, position_ids
    from gates.stacks.torch_ref.probes import forward as ref_forward

    case = _case(tmp_path, GQA)
    ref = ref_forward(case)["logits"]
    torch.use_deterministic_algorithms(False)
    init_parallel(0, backend="gloo")
    model, _, scaling = build_gpt(GQA, "unfused", torch.float32, "cpu", case.weights)
    ids, _ = case.global_batch(0)
    args = (ids, position_ids(*ids.shape, "cpu"), causal_mask(ids.shape[1], "cpu"))
    with torch.no_grad():
        hooked = model(*args)
        scaling.remove()
        bare = model(*args)
    assert _rel(hooked, ref) < 2e-5
    assert _rel(bare, ref) > 1e-2


def test_padding_row_gets_no_gradient(tmp_path, shims) -> None:
    from gates.stacks.megatron.probes import run_probe as mg_probe

    cfg = _padded(tmp_path, UNTIED)
    torch.use_deterministic_algorithms(False)
    got, _ = mg_probe("backward", _case(tmp_path, cfg), "unfused", torch.device("cpu"), backend="gloo")
    grad = got["grad.model.embed_tokens.weight"]
    assert grad[cfg.pad_token_id].abs().max() == 0 and grad.abs().max() > 0


def test_without_the_rope_hooks_the_logits_differ(tmp_path, shims) -> None:
    from gates.stacks.megatron.model import build_gpt, causal_mask, init_parallel, position_ids
    from gates.stacks.torch_ref.probes import forward as ref_forward

    case = _case(tmp_path, LONG)
    ref = ref_forward(case)["logits"]
    torch.use_deterministic_algorithms(False)
    init_parallel(0, backend="gloo")
    model, _, scaling = build_gpt(LONG, "unfused", torch.float32, "cpu", case.weights)
    ids, _ = case.global_batch(0)
    args = (ids, position_ids(*ids.shape, "cpu"), causal_mask(ids.shape[1], "cpu"))
    with torch.no_grad():
        hooked = model(*args)
        for h in scaling.handles[-1 - LONG.num_layers:]:  # the rotary hook and the per-layer cos/sin scale
            h.remove()
        plain = model(*args)
    assert _rel(hooked, ref) < 2e-5
    assert _rel(plain, ref) > 2e-4  # measured 8e-4 (small random weights), vs < 2e-5 with the hooks


def test_bf16_through_float16module_is_within_bf16_noise(tmp_path, shims) -> None:
    """bf16 as the GPU runs it (Megatron's Float16Module): no further from fp32 than the bf16 reference
    is, by the agreement report's rule (benchmarks/agreement.py)."""
    from benchmarks.agreement import FACTOR, FLOOR
    from gates.stacks.megatron.probes import run_probe as mg_probe
    from gates.stacks.torch_ref.probes import run_probe as ref_probe

    cases = {}
    for dtype in ("bfloat16", "float32"):
        spec = make_spec(GQA, steps=1, micro_batch_size=2, grad_accum=2, seq_length=24, dtype=dtype, seed=7)
        cases[dtype] = load_case(new_case(tmp_path / dtype, spec))
    for probe in ("forward", "backward"):
        r32, _ = ref_probe(probe, cases["float32"], tmp_path)
        r16, _ = ref_probe(probe, cases["bfloat16"], tmp_path)
        torch.use_deterministic_algorithms(False)
        got, _ = mg_probe(probe, cases["bfloat16"], "unfused", torch.device("cpu"), backend="gloo")
        for name in r32:
            bound = max(FACTOR * _rel(r16[name], r32[name]), FLOOR[probe])
            assert _rel(got[name], r32[name]) <= bound, (probe, name)
