"""megatron-core's GPTModel configured as MiniCPM4, with the MiniCPM scales applied by forward hooks.

The model is megatron-core's own (`GPTModel`, `get_gpt_layer_local_spec(normalization="RMSNorm")`:
ColumnParallelLinear / RowParallelLinear, torch RMSNorm, Megatron's RoPE, SwiGLU as its gated linear
unit), unmodified. MiniCPM's three scales are added from outside with PyTorch module hooks, which
change no Megatron code and no Megatron math:
- a forward hook on `embedding` multiplies its output by `scale_emb`;
- forward hooks on every layer's `self_attention` and `mlp` multiply their output (the first element
  of Megatron's (output, bias) pair; bias is None) by `scale_depth / sqrt(L)`, i.e. before the
  bias-dropout-add that adds the residual;
- a forward pre-hook on `output_layer` divides its input (the final RMSNorm's output) by
  `hidden / dim_model_base`.
The config's RoPE and padding, where they differ from Megatron's, the same way:
- with `rope_scaling` (LongRoPE, linear), a forward hook on `rotary_pos_emb` replaces the angles it returns
  by the config's (per-frequency divisors, the reference's float64 math); a cos/sin scale m != 1 becomes a
  forward pre-hook on each `core_attention` that multiplies the rotated query and key by m (m cos, m sin
  rotate q and k into m times the same vectors);
- with `pad_token_id`, a forward hook on `word_embeddings` detaches the rows looked up for that id, so the
  padding row gets no gradient from the lookup (MiniCPM's nn.Embedding padding_idx).
Optionally, forward hooks on each TransformerLayer record the residual stream for the forward probe.

Two attention variants, through the layer spec only: `unfused` (the local spec as shipped: Megatron's
DotProductAttention) and `sdpa` (the local spec with `core_attention` swapped for `SdpaCoreAttention`).
No Transformer Engine, no apex: the fused options that need them are off.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gates.model_config import MiniCPMConfig
from gates.stacks.megatron.convert import hf_to_megatron, megatron_param_shapes, megatron_to_hf
from gates.stacks.torch_ref.model import rope_inv_freq

Attention = Literal["unfused", "sdpa"]
ATTENTIONS: tuple[str, ...] = ("unfused", "sdpa")


def unavailable_reason() -> str | None:
    """Why this stack cannot run here (None when it can): it needs CUDA and megatron-core."""
    if not torch.cuda.is_available():
        return "the megatron stack runs on a CUDA GPU only; this machine has none"
    try:
        import megatron.core  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"megatron-core is not importable here ({type(e).__name__}: {e}); install megatron-core==0.15.x"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(seed: int, backend: str = "nccl") -> None:
    """torch.distributed + Megatron's parallel state, TP = PP = 1 (DP = world size). Single-process runs
    without torchrun get a private rendezvous on a free local port."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group(backend)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(cfg: MiniCPMConfig, dtype: torch.dtype) -> Any:
    """Megatron's TransformerConfig for this MiniCPM config: RMSNorm, SwiGLU, GQA, no bias, no dropout,
    RoPE (set on the GPTModel), and no fused option that needs Transformer Engine or apex."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, kv_channels=cfg.dim_head, ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, init_method_std=0.02,
        # Off: each needs Transformer Engine or apex, absent on the lent GPUs.
        gradient_accumulation_fusion=False, persist_layer_norm=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def layer_spec(attention: Attention) -> Any:
    """The local (non-TE) GPT layer spec; for `sdpa` its core attention is swapped through the spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; one of {ATTENTIONS}")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "sdpa":
        from gates.stacks.megatron.sdpa import SdpaCoreAttention

        spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=SdpaCoreAttention)
    return spec


class MiniCPMScaling:
    """Registers MiniCPM's scales, and the config's RoPE scaling and padding, on a GPTModel as hooks (see the
    module docstring); `capture=True` also records the residual stream (embedding output and each layer's
    output, (b, s, h))."""

    def __init__(self, gpt: nn.Module, cfg: MiniCPMConfig):
        self.cfg = cfg
        self.capture = False
        self.hidden_states: list[Tensor] = []
        self.handles = [gpt.embedding.register_forward_hook(self._scale_embedding)]
        for layer in gpt.decoder.layers:
            self.handles.append(layer.self_attention.register_forward_hook(self._scale_branch))
            self.handles.append(layer.mlp.register_forward_hook(self._scale_branch))
            self.handles.append(layer.register_forward_hook(self._record_layer))
        self.handles.append(gpt.output_layer.register_forward_pre_hook(self._scale_logits_input))
        if cfg.rope_scaling is not None:
            self.handles.append(gpt.rotary_pos_emb.register_forward_hook(self._rope_angles, with_kwargs=True))
            for layer in gpt.decoder.layers:
                self.handles.append(layer.self_attention.core_attention.register_forward_pre_hook(self._rope_scale))
        if cfg.pad_token_id is not None:
            self.handles.append(gpt.embedding.word_embeddings.register_forward_hook(self._no_padding_grad))
        self._angles: dict[tuple, Tensor] = {}  # (seq, device, dtype) -> the config's angles
        self._scale = 1.0  # cos/sin scale of the sequence length last seen by _rope_angles

    def _rope_angles(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        seq = args[0] if args else kwargs["max_seq_len"]
        if (args[1:2] or [kwargs.get("offset", 0)])[0]:
            raise RuntimeError("MiniCPM's RoPE scaling hook covers positions from 0 only (no offset)")
        key = (seq, out.device, out.dtype)
        if key not in self._angles:
            inv_freq, _ = rope_inv_freq(self.cfg, seq)
            angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
            self._angles[key] = torch.cat([angles, angles], -1)[:, None, None, :].to(out.device, out.dtype)
        if out.shape != self._angles[key].shape:
            raise RuntimeError(f"Megatron's rotary embedding returned {tuple(out.shape)}, the hook expects "
                               f"{tuple(self._angles[key].shape)} (rotary_percent 1, no interleave, no context parallel)")
        self._scale = self.cfg.rope_at(seq)[1]
        return self._angles[key]

    def _rope_scale(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._scale == 1.0:
            return None
        query, key, *rest = args  # (s, b, heads, d), rotated
        return (query * self._scale, key * self._scale, *rest)

    def _no_padding_grad(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        pad = (args[0] == self.cfg.pad_token_id).unsqueeze(-1)  # (b, s, 1)
        return torch.where(pad, out.detach(), out)

    def _scale_embedding(self, module: nn.Module, args: Any, out: Tensor) -> Tensor:
        out = out * self.cfg.scale_emb  # (s, b, h)
        if self.capture:
            self.hidden_states.append(out.detach().transpose(0, 1))
        return out

    def _scale_branch(self, module: nn.Module, args: Any, out: tuple[Tensor, Tensor | None]):
        y, bias = out
        if bias is not None:
            raise RuntimeError("MiniCPM has no biases; a branch returned one")
        return y * self.cfg.residual_scale, bias

    def _record_layer(self, module: nn.Module, args: Any, out: tuple[Tensor, Any]) -> None:
        if self.capture:
            self.hidden_states.append(out[0].detach().transpose(0, 1))  # (s, b, h) -> (b, s, h)

    def _scale_logits_input(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] / self.cfg.logit_scale, *args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def build_gpt(cfg: MiniCPMConfig, attention: Attention, dtype: torch.dtype, device: torch.device | str,
              weights: dict[str, Tensor] | None = None) -> tuple[nn.Module, nn.Module, MiniCPMScaling]:
    """(model, gpt, scaling): `gpt` is Megatron's GPTModel with MiniCPM hooks; `model` is what trains it:
    for bf16 Megatron's own Float16Module around it (as Megatron's training does), else `gpt` itself.
    `weights` are HF-named (converted here); without them Megatron's own init is kept."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.module import Float16Module

    tc = transformer_config(cfg, dtype)
    if weights is not None:
        tc.perform_initialization = False  # overwritten below: skip the init work
    gpt = GPTModel(
        tc, layer_spec(attention), vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_seq_length,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta), rotary_percent=1.0, parallel_output=True,
    )
    gpt.to(device)
    if weights is not None:
        load_hf_weights(gpt, weights, cfg)
    scaling = MiniCPMScaling(gpt, cfg)
    model = Float16Module(tc, gpt) if dtype == torch.bfloat16 else gpt
    return model, gpt, scaling


def load_hf_weights(gpt: nn.Module, weights: dict[str, Tensor], cfg: MiniCPMConfig) -> None:
    """Copy HF-named weights into the GPTModel's parameters (exact parameter set required)."""
    converted = hf_to_megatron(weights, cfg)
    params = dict(gpt.named_parameters())
    if set(params) != set(megatron_param_shapes(cfg)):
        raise RuntimeError(f"GPTModel parameters differ from the expected layout: {sorted(set(params) ^ set(megatron_param_shapes(cfg)))[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(converted[name].to(p.dtype))


def hf_named(tensors_by_megatron_name: dict[str, Tensor], cfg: MiniCPMConfig) -> dict[str, Tensor]:
    """Megatron-named tensors (parameters, grads, master weights) back to HF names."""
    return megatron_to_hf(tensors_by_megatron_name, cfg)


def causal_mask(seq: int, device: torch.device | str) -> Tensor:
    """Megatron's mask convention: True where attention is NOT allowed, shape (1, 1, s, s)."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)[None, None]


def position_ids(batch: int, seq: int, device: torch.device | str) -> Tensor:
    return torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
