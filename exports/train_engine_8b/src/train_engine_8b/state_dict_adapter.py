"""Between the model (plain or tensor-parallel) and Hugging Face layouts.

- `to_hf(model)`: every parameter as one unsharded tensor under its HF MiniCPM name (a TP model's DTensors
  gathered); the native layout OpenBMB publishes.
- `load_hf(model, state)`: the inverse: full HF-named tensors into a plain or TP model, each rank keeping
  its own shard (no communication: every rank holds the full tensors).
- then the shared minicpm/hf_fold.py (`fold_to_llama`, `llama_config_dict`): MiniCPM's scalar scales folded
  into the weights, so `transformers.LlamaForCausalLM` computes the same logits without remote code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from train_engine_8b.minicpm.config import MiniCPMConfig, hf_param_shapes


def to_hf(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """{HF name: full tensor} on every rank. Under TP this is a collective (all ranks call it, same order)."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = full.detach().to(dtype or full.dtype).clone()
    return out


@torch.no_grad()
def load_hf(model: nn.Module, cfg: MiniCPMConfig, state: dict[str, Tensor]) -> None:
    """Copy full HF-named weights (any float dtype) into the model's parameters (plain or DTensor shards)."""
    want = hf_param_shapes(cfg)
    if set(want) != set(state):
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in model.named_parameters():
        w = state[name]
        if tuple(w.shape) != want[name]:
            raise ValueError(f"{name}: shape {tuple(w.shape)}, model has {want[name]}")
        w = w.to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):  # src_data_rank=None: take this rank's shard of its own full copy
            p.to_local().copy_(distribute_tensor(w, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(w)
