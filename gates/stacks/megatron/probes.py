"""The `megatron` stacks' answers to the probe contract (gates/probe.py): forward, backward, steps.

`checkpoint` is unsupported (exit 77): Megatron's distributed checkpointing is not wired in here.
Under torchrun each rank takes its rows of each step (`case.batches[..., rank]`) and rank 0 writes.
Model dtype is the case's (bf16 runs Megatron's Float16Module; float32 runs it as is); fp64 cases are
unsupported. The case's `device` is ignored: this stack runs on CUDA only, and says so in metrics.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from gates.case import Case
from gates.stacks.megatron.model import Attention, build_gpt, causal_mask, hf_named, init_parallel, position_ids
from gates.stacks.megatron.train import IGNORE_INDEX, MegatronTrainer
from gates.stacks.torch_ref.optim import lr_at

SUPPORTED_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _rank_micro_batches(case: Case, step: int, device: torch.device) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """This rank's micro batches of step `step`, and the global count of labels != -100."""
    rank = torch.distributed.get_rank()
    ids, labels = case.batches["input_ids"][step, rank], case.batches["labels"][step, rank]
    global_count = int((case.batches["labels"][step] != IGNORE_INDEX).sum())
    mb = case.spec.micro_batch_size
    chunks = [(ids[i : i + mb].to(device), labels[i : i + mb].to(device)) for i in range(0, ids.shape[0], mb)]
    return chunks, global_count


def forward(case: Case, attention: Attention, device: torch.device) -> dict[str, Tensor]:
    """Logits, loss and the residual stream on step 0's global batch (every rank computes it)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    cfg, dtype = case.spec.model, SUPPORTED_DTYPES[case.spec.dtype]
    model, _, scaling = build_gpt(cfg, attention, dtype, device, case.weights)
    model.eval()
    ids, labels = (t.to(device) for t in case.global_batch(0))
    b, s = ids.shape
    scaling.capture = True
    with torch.no_grad():
        logits = model(ids, position_ids(b, s, device), causal_mask(s, device))  # (b, s, V)
        token_loss = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                  labels.clamp(min=0).t().contiguous())  # (s, b)
        mask = (labels != IGNORE_INDEX).t()
        loss = (token_loss * mask).sum() / mask.sum()
    out = {"logits": logits, "loss": loss}
    return out | {f"hidden_states.{i}": h for i, h in enumerate(scaling.hidden_states)}


def backward(case: Case, attention: Attention, device: torch.device) -> dict[str, Tensor]:
    dtype = SUPPORTED_DTYPES[case.spec.dtype]
    trainer = MegatronTrainer(case.spec.model, attention, dtype, device, case.spec.optimizer, case.weights,
                              with_optimizer=False)
    chunks, count = _rank_micro_batches(case, 0, device)
    loss = trainer.forward_backward(chunks, count)
    grads = hf_named(trainer.main_grads(), case.spec.model)
    return {"loss": loss} | {f"grad.{k}": g for k, g in grads.items()}


def steps(case: Case, attention: Attention, device: torch.device) -> dict[str, Tensor]:
    spec = case.spec
    trainer = MegatronTrainer(spec.model, attention, SUPPORTED_DTYPES[spec.dtype], device, spec.optimizer, case.weights)
    losses, norms, lrs = [], [], []
    for t in range(spec.steps):
        chunks, count = _rank_micro_batches(case, t, device)
        losses.append(trainer.forward_backward(chunks, count))
        lr = lr_at(t + 1, spec.steps, spec.optimizer, spec.schedule)
        norms.append(trainer.optimizer_step(lr))
        lrs.append(lr)
    weights = hf_named(trainer.master_weights(), spec.model)
    out = {
        "losses": torch.stack(losses),
        "grad_norms": torch.tensor(norms, dtype=torch.float32),
        "lrs": torch.tensor(lrs, dtype=torch.float64),
    }
    return out | {f"weight.{k}": w for k, w in weights.items()}


def run_probe(name: str, case: Case, attention: Attention, device: torch.device | None = None,
              backend: str = "nccl") -> tuple[dict[str, Tensor], dict]:
    """Runs one probe; the caller has checked that it is supported. `device`/`backend` default to CUDA
    and NCCL (CPU + gloo exist only for the CPU tests of this module's logic)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    init_parallel(case.spec.seed, backend)
    t0 = time.perf_counter()
    tensors = {"forward": forward, "backward": backward, "steps": steps}[name](case, attention, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    import megatron.core

    metrics = {
        "probe": name, "stack": "megatron" if attention == "unfused" else "megatron-sdpa",
        "attention": attention, "time_s": time.perf_counter() - t0, "device": str(device),
        "case_device": case.spec.device, "dtype": case.spec.dtype,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "layer_spec": "local (no Transformer Engine)",
        "minicpm_scales": "forward hooks (embedding, attention/MLP outputs, output-layer input)",
    }
    if "loss" in tensors:
        metrics["loss"] = float(tensors["loss"])
    if "losses" in tensors:
        metrics["losses"] = [float(x) for x in tensors["losses"]]
    return tensors, metrics
