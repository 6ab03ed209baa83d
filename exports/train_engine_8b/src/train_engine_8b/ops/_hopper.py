"""The one check the Hopper-only (sm90+) op modules share: flash4 attention and the quack gated MLP run
bf16 / fp16 CUDA tensors on compute capability 9.0 or newer."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import EngineError


def gpu_too_old(what: str) -> str | None:
    """Why `what` cannot run on this machine's GPU (pre-Hopper), or None (Hopper+, or no GPU at all)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0):
        return f"{what} needs compute capability >= 9.0; this GPU has {torch.cuda.get_device_capability()}"
    return None


def require_hopper_half(x: Tensor, selection: str, fallback: str) -> None:
    """Raise EngineError, naming `selection` (e.g. "attention=flash4") and the `fallback` implementation,
    unless `x` is a bf16 / fp16 CUDA tensor on compute capability 9.0+."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        raise EngineError(f"ops.{selection} needs bf16/fp16 CUDA tensors, got {x.dtype} on {x.device.type}")
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        raise EngineError(f"ops.{selection} needs compute capability >= 9.0 (H100 or newer); use {fallback}")
