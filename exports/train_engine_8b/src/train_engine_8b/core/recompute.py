"""Activation recomputation of one region of a model's forward (the model decides the regions; parallelize.py
decides whether they recompute)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def maybe_recompute(on: bool, fn: Callable, *args):
    """fn(*args), keeping only the inputs for backward when `on` and autograd records (non-reentrant, so it
    composes with torch.compile and DTensor)."""
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
