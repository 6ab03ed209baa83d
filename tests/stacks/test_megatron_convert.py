"""HF MiniCPM <-> Megatron weight conversion (pure torch, no megatron-core needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gates.case import hf_param_shapes, random_weights
from gates.model_config import MiniCPMConfig, preset
from gates.stacks.megatron.convert import (fuse_gate_up, fuse_qkv, hf_to_megatron, megatron_param_shapes,
                                           megatron_to_hf, split_qkv)

CONFIGS = {
    "tiny": preset("tiny"),
    # several KV groups, head_dim not hidden/heads, untied output
    "gqa3": MiniCPMConfig(name="gqa3", hidden_size=48, num_layers=2, num_heads=12, num_kv_heads=3, head_dim=16,
                          ffn_hidden_size=80, vocab_size=97, max_seq_length=64, tie_word_embeddings=False),
    "mha": MiniCPMConfig(name="mha", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
                         ffn_hidden_size=40, vocab_size=50, max_seq_length=64),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_both_ways_is_exact(name: str) -> None:
    cfg = CONFIGS[name]
    hf = random_weights(cfg, seed=11)
    mg = hf_to_megatron(hf, cfg)
    assert {k: tuple(v.shape) for k, v in mg.items()} == megatron_param_shapes(cfg)
    back = megatron_to_hf(mg, cfg)
    assert set(back) == set(hf_param_shapes(cfg))
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    # and starting from the Megatron side
    gen = torch.Generator().manual_seed(5)
    mg2 = {k: torch.randn(s, generator=gen) for k, s in megatron_param_shapes(cfg).items()}
    again = hf_to_megatron(megatron_to_hf(mg2, cfg), cfg)
    for k in mg2:
        assert torch.equal(again[k], mg2[k]), k


def _megatron_qkv_split(mixed: torch.Tensor, n: int, g: int, d: int) -> tuple[torch.Tensor, ...]:
    """How Megatron's SelfAttention splits the fused projection at run time: (..., g, (n/g + 2) * d) per
    token, then [q heads of the group, k, v]; queries flattened to n heads in group order."""
    per = n // g
    grouped = mixed.view(*mixed.shape[:-1], g, (per + 2) * d)
    q, k, v = grouped.split([per * d, d, d], dim=-1)
    return q.reshape(*mixed.shape[:-1], n, d), k, v  # (..., n, d), (..., g, d), (..., g, d)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_layout_computes_the_separate_projections(name: str) -> None:
    cfg = CONFIGS[name]
    n, g, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.dim_head, cfg.hidden_size
    hf = random_weights(cfg, seed=3)
    mg = hf_to_megatron(hf, cfg)
    x = torch.randn(5, 7, h, dtype=torch.float64)
    p, m = "model.layers.1." if cfg.num_layers > 1 else "model.layers.0.", "decoder.layers.1." if cfg.num_layers > 1 else "decoder.layers.0."
    w = {k: v.double() for k, v in hf.items()}
    q, k, v = _megatron_qkv_split(x @ mg[m + "self_attention.linear_qkv.weight"].double().t(), n, g, d)
    torch.testing.assert_close(q, (x @ w[p + "self_attn.q_proj.weight"].t()).view(5, 7, n, d), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k, (x @ w[p + "self_attn.k_proj.weight"].t()).view(5, 7, g, d), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, (x @ w[p + "self_attn.v_proj.weight"].t()).view(5, 7, g, d), rtol=1e-12, atol=1e-12)
    # Megatron's gated linear unit: act(first half) * second half of fc1's output
    a, b = torch.chunk(x @ mg[m + "mlp.linear_fc1.weight"].double().t(), 2, dim=-1)
    want = F.silu(x @ w[p + "mlp.gate_proj.weight"].t()) * (x @ w[p + "mlp.up_proj.weight"].t())
    torch.testing.assert_close(F.silu(a) * b, want, rtol=1e-12, atol=1e-12)


def test_grouping_is_per_kv_group_not_plain_concatenation() -> None:
    """With several groups the layout is interleaved: a plain [q; k; v] stack would be wrong."""
    cfg = CONFIGS["gqa3"]
    hf = random_weights(cfg, seed=1)
    q, k, v = (hf[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    fused = fuse_qkv(q, k, v, cfg.num_heads, cfg.num_kv_heads)
    assert not torch.equal(fused, torch.cat([q, k, v]))
    per, d = cfg.num_heads // cfg.num_kv_heads, cfg.dim_head
    block = (per + 2) * d
    for grp in range(cfg.num_kv_heads):  # group grp: its query heads, then its k head, then its v head
        rows = fused[grp * block:(grp + 1) * block]
        assert torch.equal(rows[: per * d], q[grp * per * d:(grp + 1) * per * d])
        assert torch.equal(rows[per * d: per * d + d], k[grp * d:(grp + 1) * d])
        assert torch.equal(rows[per * d + d:], v[grp * d:(grp + 1) * d])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg.num_heads, cfg.num_kv_heads), (q, k, v)))
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(fuse_gate_up(gate, up)[:6], gate) and torch.equal(fuse_gate_up(gate, up)[6:], up)


def test_tied_config_has_no_output_layer_and_missing_weights_fail() -> None:
    cfg = CONFIGS["tiny"]
    assert "output_layer.weight" not in megatron_param_shapes(cfg)
    assert "output_layer.weight" in megatron_param_shapes(CONFIGS["gqa3"])
    hf = random_weights(cfg, seed=2)
    del hf["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(KeyError):
        hf_to_megatron(hf, cfg)
