"""The 8B model on one process: its config is the released one, its names are HF MiniCPM's, and
transformers' LlamaForCausalLM, given the folded weights, computes the same logits (an independent reference).

Tolerance: transformers computes its RoPE angles in float32 even for a float64 model (position x inv_freq, rounded
at ~6e-8 relative: ~1e-5 rad at position 150), so in fp64 the logits agree to ~2e-6 relative, not 1e-15; we
assert 1e-5, while a RoPE off by its LongRoPE factors misses by > 0.1.
"""

import pytest
import torch

from train_engine_8b.minicpm.hf_fold import fold_to_llama, llama_config_dict
from train_engine_8b.minicpm.init import init_weights
from train_engine_8b.minicpm.config import check_hf_names
from train_engine_8b.model import MiniCPM
from train_engine_8b.model_config import ConfigError, LongRope, MiniCPMConfig, preset
from train_engine_8b.state_dict_adapter import load_hf, to_hf


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _model(cfg, weights, dtype=torch.float64):
    model = MiniCPM(cfg).to(dtype)
    load_hf(model, cfg, weights)
    return model


def _weights(cfg):
    """Fresh random fp64 weights (std 0.1: attention sharp enough that RoPE's factors matter)."""
    return {k: v.double() for k, v in init_weights(cfg, init_std=0.1, seed=int(torch.randint(0, 2**30, ()))).items()}


def test_released_preset_is_the_8b():
    cfg = preset("minicpm4-8b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head) == (4096, 32, 32, 2, 128)
    assert (cfg.ffn_hidden_size, cfg.vocab_size, cfg.pad_token_id, cfg.tie_word_embeddings) == (16384, 73448, 2, False)
    assert isinstance(cfg.rope_scaling, LongRope) and len(cfg.rope_scaling.short_factor) == 64
    assert 8.0e9 < cfg.num_params() < 8.3e9
    small = preset("minicpm4-8b-reduced")
    assert (small.dim_head, small.num_heads // small.num_kv_heads, small.tie_word_embeddings) == (128, 16, False)
    assert small.rope_scaling == cfg.rope_scaling and small.pad_token_id == 2


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MiniCPMConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=3, ffn_hidden_size=8, vocab_size=16)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("minicpm4-9b")


def test_names_are_hf_minicpm():
    cfg = preset("minicpm4-8b-reduced")
    check_hf_names(cfg, MiniCPM(cfg))
    w = _weights(cfg)
    assert all(torch.equal(a, w[k]) for k, a in to_hf(_model(cfg, w)).items())


@pytest.mark.parametrize("long", [False, True], ids=["released-rope", "long-factors"])
def test_llama_reproduces_logits(long):
    cfg = preset("minicpm4-8b-reduced")
    if long:  # original length 64 < the 150 positions: long factors, cos / sin scaled
        short = cfg.rope_scaling.short_factor
        cfg = cfg.model_copy(update={"rope_scaling": LongRope(short_factor=short, long_factor=[2 * f for f in short],
                                                              original_max_position_embeddings=64)})
    transformers = pytest.importorskip("transformers")
    w = _weights(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 150))
    ids[0, :7] = cfg.pad_token_id
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(cfg))).double().eval()
    llama.load_state_dict(fold_to_llama(cfg, w), strict=True)
    plain = _model(cfg.model_copy(update={"rope_scaling": None}), w)
    with torch.no_grad():
        want = _model(cfg, w)(ids)
        assert _rel(llama(input_ids=ids).logits, want) < 1e-5
        assert _rel(plain(ids), want) > 0.1  # RoPE's factors matter at this gain: the check can fail


def test_padding_row_gets_no_gradient():
    cfg = preset("minicpm4-8b-reduced")
    model = _model(cfg, _weights(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    ids[:, ::3] = cfg.pad_token_id
    model.loss_sum(ids, torch.randint(0, cfg.vocab_size, (2, 32))).backward()
    g = model.model.embed_tokens.weight.grad
    assert torch.count_nonzero(g[cfg.pad_token_id]) == 0
    assert torch.count_nonzero(g[ids[0, 1]]) > 0


@pytest.mark.parametrize("mode", ["mlp", "attention", "layer"])
def test_recompute_gives_the_same_gradients(mode):
    cfg = preset("minicpm4-8b-reduced")
    w = _weights(cfg)
    ids, labels = torch.randint(0, cfg.vocab_size, (2, 24)), torch.randint(0, cfg.vocab_size, (2, 24))
    grads = []
    for m in ("none", mode):
        model = _model(cfg, w)
        for layer in model.model.layers:
            layer.recompute = m
        model.loss_sum(ids, labels).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
