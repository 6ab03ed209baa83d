"""Independent check of the reference: transformers' LlamaForCausalLM, given the reference's weights
with MiniCPM's scales folded in, reproduces the reference's logits and loss.

Tolerances: transformers computes its RoPE tables in float32 even for a float64 model, so in fp64 the
two agree to ~1e-7 relative (the float32 rounding of cos/sin), not 1e-15; we assert 1e-6. In fp32,
accumulated rounding of two different op orders: 1e-5 relative.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gates.case import random_weights
from gates.hf_fold import fold_to_llama, llama_config_dict
from gates.model_config import LongRope, preset
from gates.stacks.torch_ref.model import MiniCPM, loss_sum


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tied", [True, False])
def test_llama_reproduces_reference(dtype, bound, tied):
    cfg = preset("tiny").model_copy(update={"tie_word_embeddings": tied, "num_kv_heads": 2})
    weights = random_weights(cfg, seed=int(torch.randint(0, 2**30, ())), dtype=dtype)
    ref = MiniCPM(cfg).to(dtype)
    ref.load_state_dict(weights)
    llama = LlamaForCausalLM(LlamaConfig(**llama_config_dict(cfg))).to(dtype).eval()
    llama.load_state_dict(fold_to_llama(cfg, weights), strict=True)

    ids = torch.randint(0, cfg.vocab_size, (3, 37))
    labels = torch.randint(0, cfg.vocab_size, (3, 37))
    labels[0, :5] = -100
    with torch.no_grad():
        ref_logits = ref(ids)
        hf_logits = llama(input_ids=ids).logits
    assert _rel(hf_logits, ref_logits) < bound
    total, count = loss_sum(ref_logits, labels)
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs(float(total / count) - float(hf_loss)) < bound * float(hf_loss)


def _longrope(long: bool):
    """The released 0.5B config at reduced size (head dim 64: its 32 factors as published); `long`: original length
    64 < the test's 150 positions (long factors, cos/sin scaled), untied, pad_token_id 2."""
    base = preset("minicpm4-0.5b")
    cfg = base.model_copy(update=dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=256,
                                      vocab_size=300))
    if long:
        short = base.rope_scaling.short_factor
        rope = LongRope(short_factor=short, long_factor=[2 * f for f in short], original_max_position_embeddings=64)
        cfg = cfg.model_copy(update={"rope_scaling": rope, "max_seq_length": 4096, "tie_word_embeddings": False,
                                     "pad_token_id": 2})
    return cfg


@pytest.mark.parametrize("long", [False, True], ids=["released", "long-factors"])
def test_llama_longrope_reproduces_reference(long):
    """transformers' own `longrope` with the fold's config computes the reference's LongRoPE (q / k scaled so
    attention is sharp and positions matter: plain RoPE misses by > 10 %)."""
    cfg = _longrope(long)
    weights = {k: v * 15 if "q_proj" in k or "k_proj" in k else v
               for k, v in random_weights(cfg, seed=int(torch.randint(0, 2**30, ())), dtype=torch.float64).items()}
    ref = MiniCPM(cfg).double()
    ref.load_state_dict(weights)
    plain = MiniCPM(cfg.model_copy(update={"rope_scaling": None})).double()
    plain.load_state_dict(weights)
    llama = LlamaForCausalLM(LlamaConfig(**llama_config_dict(cfg))).double().eval()
    llama.load_state_dict(fold_to_llama(cfg, weights), strict=True)
    assert llama.model.embed_tokens.padding_idx == cfg.pad_token_id
    ids = torch.randint(0, cfg.vocab_size, (2, 150))
    with torch.no_grad():
        want = ref(ids)
        assert _rel(llama(input_ids=ids).logits, want) < 1e-6
        assert _rel(plain(ids), want) > 0.1


def test_fold_is_not_identity():
    """The fold must change exactly the scaled tensors (guards against a no-op fold passing)."""
    cfg = preset("tiny")
    w = random_weights(cfg, seed=3)
    f = fold_to_llama(cfg, w)
    assert torch.equal(f["model.embed_tokens.weight"], w["model.embed_tokens.weight"] * 12.0)
    assert torch.allclose(f["model.layers.1.mlp.down_proj.weight"], w["model.layers.1.mlp.down_proj.weight"] * 1.4 / 2**0.5)
    assert torch.equal(f["model.layers.0.self_attn.q_proj.weight"], w["model.layers.0.self_attn.q_proj.weight"])
    assert torch.allclose(f["lm_head.weight"], w["model.embed_tokens.weight"] / (64 / 256))
