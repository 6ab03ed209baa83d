"""The released MiniCPM4's RoPE and padding, end to end in float64 on CPU: on a reduced model with the released
0.5B config's LongRoPE (head dim 64, so its 32 factors apply as published), at lengths up to 4096, the workspace
reference (gates/stacks/torch_ref), this engine and its `export-hf` directory in transformers (LlamaForCausalLM,
rope type `longrope`) agree: logits, loss and, reference vs engine, every gradient. A second config goes past
original_max_position_embeddings (long factors, cos/sin scaled by sqrt(1 + ln(4) / ln(1024))) with an untied
head and pad_token_id 2, whose embedding row gets no gradient.

q_proj / k_proj are scaled up so attention is sharp: plain RoPE then differs from LongRoPE by > 10 % (checked),
so a stack that drops the factors cannot pass (measured 0.30 and 0.34 at 4096). Bounds: reference vs engine
compute the same fp64 ops (measured: bitwise equal logits, loss and gradients), bound 1e-12; transformers
computes its RoPE angles in float32 even for a float64 model (an angle near 4095 rad is off by up to 2.4e-4) and
the export stores float32 weights, so the HF logits agree to ~1e-5 (measured at 4096: 1.6e-5 released config,
1.1e-5 long factors; loss 1.2e-8 and 8.6e-9 relative), bound 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gates.case import random_weights
from gates.stacks.torch_ref.model import MiniCPM as Reference
from train_engine_0_5b.core import checkpoint as ckpt
from train_engine_0_5b.core.dist import DistContext
from train_engine_0_5b.core.optim import AdamW
from train_engine_0_5b.export_hf import export
from train_engine_0_5b.model import build_model, load_weights
from train_engine_0_5b.model_config import LongRope, MiniCPMConfig, preset
from train_engine_0_5b.ops.registry import OpSelection, resolve

transformers = pytest.importorskip("transformers")

ENGINE_REL, HF_REL = 1e-12, 1e-4
SMALL = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=256, vocab_size=512)


def _released_reduced() -> MiniCPMConfig:
    """The released 0.5B config (LongRoPE, eps 1e-5, tied, max == original == 32768) at reduced width and depth."""
    return MiniCPMConfig(**(preset("minicpm4-0.5b").model_dump(exclude={"name"}) | SMALL), name="released-reduced")


def _beyond_original() -> MiniCPMConfig:
    """Original length 1024, max 4096: sequences past 1024 take the long factors, cos/sin scaled; untied, pad 2."""
    short = preset("minicpm4-0.5b").rope_scaling.short_factor
    rope = LongRope(short_factor=short, long_factor=[f * 1.5 + 0.5 for f in short], original_max_position_embeddings=1024)
    return _released_reduced().model_copy(update={"name": "beyond", "rope_scaling": rope, "max_seq_length": 4096,
                                                  "tie_word_embeddings": False, "pad_token_id": 2})


def _weights(cfg: MiniCPMConfig, seed: int) -> dict[str, torch.Tensor]:
    w = random_weights(cfg, seed=seed, dtype=torch.float32).items()  # float32 values: the export stores them exactly
    return {k: (v * 15 if "q_proj" in k or "k_proj" in k else v).double() for k, v in w}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _hf_logits(cfg: MiniCPMConfig, weights: dict[str, torch.Tensor], ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """Logits of the engine's `export-hf` directory (Llama layout, float32 file) in transformers, run in float64."""
    state = {"config": {"model": cfg.model_dump(mode="json")}}
    master = {k: v.float() for k, v in weights.items()}
    opt = AdamW({k: torch.nn.Parameter(v.clone()) for k, v in master.items()}, master, adamw_op=lambda *a, **k: None,
                betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, master_dtype=torch.float32)
    saved = ckpt.save(tmp_path / "save", 1, opt, DistContext(), {}, state)
    out = export(saved, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.rope_parameters["rope_type"] == "longrope"
    with torch.no_grad():
        return hf(input_ids=ids).logits


CASES = [
    pytest.param(_released_reduced, 4096, id="released-4096"),
    pytest.param(_beyond_original, 4096, id="long-factors-4096"),
    pytest.param(_beyond_original, 1000, id="short-factors-scaled-1000"),
]


@pytest.mark.slow
@pytest.mark.parametrize("make, S", CASES)
def test_reference_engine_and_hf_export_agree_in_fp64(make, S, tmp_path):
    cfg = make()
    weights = _weights(cfg, seed=S)
    gen = torch.Generator().manual_seed(S)
    ids = torch.randint(0, cfg.vocab_size, (1, S), generator=gen)
    ids[0, ::7] = 2  # the 8B-style pad / EOS id appears as an input
    labels = torch.roll(ids, -1, 1)
    labels[0, -1] = -100

    ref = Reference(cfg).double()
    ref.load_state_dict(weights)
    engine = build_model(cfg, resolve(OpSelection(), "cpu", torch.float64), "cpu", torch.float64)
    load_weights(engine, weights)
    ref_logits, eng_logits = ref(ids), engine(ids)
    ref_loss_t, eng_loss_t = _loss(ref_logits, labels), _loss(eng_logits, labels)
    ref_loss_t.backward()
    eng_loss_t.backward()
    ref_loss, eng_loss = ref_loss_t.item(), eng_loss_t.item()
    ref_grads = dict(ref.named_parameters())
    errors = {"logits": _rel(eng_logits.detach(), ref_logits.detach()), "loss": abs(eng_loss - ref_loss) / ref_loss}
    for name, p in engine.named_parameters():
        errors[name] = _rel(p.grad, ref_grads[name].grad)
    assert max(errors.values()) <= ENGINE_REL, errors

    if cfg.pad_token_id is not None:  # the padding row: no gradient from the lookup (untied: no other source)
        assert torch.equal(engine.model.embed_tokens.weight.grad[2], torch.zeros(cfg.hidden_size, dtype=torch.float64))
        assert ref_grads["model.embed_tokens.weight"].grad[2].abs().max() == 0
        other = int(ids[0][ids[0] != 2][0])
        assert engine.model.embed_tokens.weight.grad[other].abs().max() > 0

    with torch.no_grad():  # the test can tell: plain RoPE is another function here
        plain = Reference(cfg.model_copy(update={"rope_scaling": None})).double()
        plain.load_state_dict(weights)
        assert _rel(plain(ids), ref_logits.detach()) > 0.1

    hf_logits = _hf_logits(cfg, weights, ids, tmp_path)
    assert _rel(hf_logits, ref_logits.detach()) <= HF_REL
    assert abs(_loss(hf_logits, labels).item() - ref_loss) <= HF_REL * ref_loss


def test_export_writes_transformers_longrope():
    """The Llama config carries transformers' own longrope with MiniCPM's factor and cos/sin scale pinned."""
    from train_engine_0_5b.minicpm.hf_fold import llama_config_dict

    cfg = _beyond_original()
    rope = llama_config_dict(cfg)["rope_scaling"]
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 1024
    assert rope["short_factor"] == list(cfg.rope_scaling.short_factor)
    assert rope["long_factor"] == list(cfg.rope_scaling.long_factor)
    assert rope["factor"] == 4.0 and rope["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(1024)))
    assert llama_config_dict(cfg)["pad_token_id"] == 2
    released = llama_config_dict(preset("minicpm4-0.5b"))["rope_scaling"]
    assert (released["factor"], released["attention_factor"]) == (1.0, 1.0)


def test_fresh_weights_zero_the_padding_row():
    """As MiniCPM's nn.Embedding(padding_idx) initializes it; the other rows are drawn."""
    from train_engine_0_5b.minicpm.init import init_weights

    cfg = _beyond_original()
    model = build_model(cfg, resolve(OpSelection(), "cpu", torch.float32), "meta", torch.float32)
    emb = init_weights(model.cfg, 0.1, seed=0)["model.embed_tokens.weight"]
    assert emb[2].abs().max() == 0 and emb[1].abs().min() > 0 and emb[3].abs().max() > 0
