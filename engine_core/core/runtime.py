"""Process-level settings and state: determinism, the random generators a checkpoint carries, memory."""

from __future__ import annotations

import os
import random
import resource

import torch

from .dist import DistContext
from .errors import EngineError


def setup(device: str, deterministic: bool, reference_numerics: bool = False) -> None:
    """Check the device and pin the numerics: deterministic kernels and no TF32, so a resumed run
    repeats the straight one bit for bit on the same hardware. `reference_numerics` (the probes)
    also keeps bf16 GEMM reductions in full precision, as the torch reference stack does, and has torch
    NaN-fill every new tensor (a read of memory no kernel wrote then fails the gates); a deterministic
    run does not pay for that fill: its kernels write all of their outputs (the op tests' poisoned outputs)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but torch sees no CUDA device")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility (before its first use)
        torch.use_deterministic_algorithms(True, warn_only=True)
        # torch's default fills each allocation (GBs per step at 0.5B: MLP and logits buffers) with NaN
        torch.utils.deterministic.fill_uninitialized_memory = reference_numerics
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if reference_numerics:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch generators (CPU, and its CUDA device's)."""
    out = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list | None, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


def python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def gather_rng(ctx: DistContext) -> tuple[dict[str, torch.Tensor], list]:
    """Every rank's generators, for rank 0 to save: ({"rank{r}.{name}": state}, [python state per rank])."""
    tensors = ctx.all_gather_object({k: v.cpu() for k, v in rng_tensors(ctx.device).items()})
    flat = {f"rank{r}.{k}": v for r, states in enumerate(tensors) for k, v in states.items()}
    return flat, ctx.all_gather_object(python_rng_state())


def restore_rank_rng(flat: dict[str, torch.Tensor], python_states: list, ctx: DistContext) -> None:
    """This rank's part of what `gather_rng` saved."""
    prefix = f"rank{ctx.rank}."
    restore_rng({k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}, python_states[ctx.rank], ctx.device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
