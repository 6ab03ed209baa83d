"""The `torch` reference stack's answers to the probe contract (gates/probe.py).

One process handles the whole global batch, in `micro_batch_size`-row chunks. Mixed precision as
engines do it: the model computes in the case dtype, master weights, gradients and AdamW state are
float32 (float64 for fp64 cases).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gates.case import Case
from gates.probe import REFERENCE_EXACT_NORMS, REFERENCE_RANK_SUMS
from gates.stacks.torch_ref.model import MiniCPM, loss_sum
from gates.stacks.torch_ref.optim import AdamW, clip_grads_, exact_norm, lr_at


OPTIONS = {"attention": "eager"}  # set once by the CLI (--attention)


def make_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # SDPA's backward kernels have no deterministic variant on every backend: warn, never refuse
    torch.use_deterministic_algorithms(True, warn_only=OPTIONS["attention"] == "sdpa")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def build_model(case: Case, weights: dict[str, torch.Tensor] | None = None) -> MiniCPM:
    """The case's model holding `weights` (default: the case's), in the case's dtype on its device. Built on the meta
    device, so no parameter is initialized only to be overwritten (seconds per billion parameters on a CPU); each
    weight is copied (never aliased: training must not change the case) straight to the device and dtype."""
    spec = case.spec
    with torch.device("meta"):
        model = MiniCPM(spec.model, OPTIONS["attention"])
    source = weights if weights is not None else case.weights
    model.load_state_dict({k: v.to(device=spec.device, dtype=spec.torch_dtype, copy=True) for k, v in source.items()},
                          strict=True, assign=True)
    return model


def _chunks(ids: torch.Tensor, labels: torch.Tensor, rows: int):
    for i in range(0, ids.shape[0], rows):
        yield ids[i : i + rows], labels[i : i + rows]


def forward(case: Case) -> dict[str, torch.Tensor]:
    model = build_model(case)
    ids, labels = (t.to(case.spec.device) for t in case.global_batch(0))
    hidden: list[torch.Tensor] = []
    with torch.no_grad():
        logits = model(ids, hidden_states=hidden)
        total, count = loss_sum(logits, labels)
    out = {"logits": logits, "loss": total / count}
    out |= {f"hidden_states.{i}": h for i, h in enumerate(hidden)}
    return out


def _grads(model: MiniCPM, case: Case, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradient of step `step`'s training loss (global token mean), accumulated over micro batches in
    the master dtype; returns (grads by name, loss, per-rank loss sums (world_size,) float64: the token
    CE summed over each case rank's rows, the contract's per-rank `loss_sums`)."""
    spec = case.spec
    ids, labels = (t.to(spec.device) for t in case.global_batch(step))
    count = int((labels != -100).sum())
    params = dict(model.named_parameters())
    grads = {k: torch.zeros_like(p, dtype=spec.master_dtype) for k, p in params.items()}
    loss = torch.zeros((), dtype=spec.master_dtype, device=spec.device)
    rank_sums = torch.zeros(spec.world_size, dtype=torch.float64)
    for j, (mb_ids, mb_labels) in enumerate(_chunks(ids, labels, spec.micro_batch_size)):
        total, _ = loss_sum(model(mb_ids), mb_labels)
        (total / count).backward()
        loss += total.detach().to(spec.master_dtype) / count
        rank_sums[j // spec.grad_accum] += float(total.detach())  # rows in rank order, grad_accum chunks each
        for k, p in params.items():
            grads[k] += p.grad.to(spec.master_dtype)
            p.grad = None
    return grads, loss, rank_sums


def backward(case: Case) -> dict[str, torch.Tensor]:
    grads, loss, _ = _grads(build_model(case), case, 0)
    return {"loss": loss} | {f"grad.{k}": g for k, g in grads.items()}


class Trainer:
    """Model + AdamW + step counter; `state_dict` is everything a bit-identical resume needs."""

    def __init__(self, case: Case):
        self.case = case
        self.model = build_model(case)
        master = {k: v.to(case.spec.device, case.spec.master_dtype) for k, v in case.weights.items()}
        self.opt = AdamW(master, case.spec.optimizer)
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.exact_norms: list[torch.Tensor] = []  # the same gradients' norm accumulated in float64
        self.lrs: list[float] = []
        self.rank_loss_sums: list[torch.Tensor] = []

    @property
    def step(self) -> int:
        return self.opt.step_count

    def train_step(self) -> None:
        spec = self.case.spec
        grads, loss, rank_sums = _grads(self.model, self.case, self.step)
        names = list(grads)
        exact = exact_norm([grads[k] for k in names])  # before clipping scales them
        norm = clip_grads_([grads[k] for k in names], spec.optimizer.grad_clip)
        lr = lr_at(self.step + 1, spec.steps, spec.optimizer, spec.schedule)
        self.opt.step(grads, lr)
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                p.copy_(self.opt.master[k].to(p.dtype))
        self.losses.append(loss)
        self.grad_norms.append(norm)
        self.exact_norms.append(exact)
        self.lrs.append(lr)
        self.rank_loss_sums.append(rank_sums)

    def outputs(self) -> dict[str, torch.Tensor]:
        out = {
            "losses": torch.stack(self.losses),
            "grad_norms": torch.stack(self.grad_norms),
            "lrs": torch.tensor(self.lrs, dtype=torch.float64),
        }
        out[REFERENCE_RANK_SUMS] = torch.stack(self.rank_loss_sums)
        out[REFERENCE_EXACT_NORMS] = torch.stack(self.exact_norms)
        return out | {f"weight.{k}": v for k, v in self.opt.master.items()}

    def save(self, path: Path) -> None:
        """Atomic: written to a temporary name, then renamed."""
        sd = self.opt.state_dict()
        sd["history.losses"] = torch.stack(self.losses)
        sd["history.grad_norms"] = torch.stack(self.grad_norms)
        sd["history.exact_norms"] = torch.stack(self.exact_norms)
        sd["history.lrs"] = torch.tensor(self.lrs, dtype=torch.float64)
        sd["history.rank_loss_sums"] = torch.stack(self.rank_loss_sums)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, case: Case, path: Path) -> "Trainer":
        sd = load_file(str(path), device=case.spec.device)
        self = cls(case)
        self.opt.load_state_dict(sd)
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                p.copy_(self.opt.master[k].to(p.dtype))
        self.losses = list(sd["history.losses"].unbind())
        self.grad_norms = list(sd["history.grad_norms"].unbind())
        self.exact_norms = list(sd["history.exact_norms"].unbind())
        self.lrs = sd["history.lrs"].tolist()
        self.rank_loss_sums = list(sd["history.rank_loss_sums"].unbind())
        return self


def steps(case: Case) -> dict[str, torch.Tensor]:
    trainer = Trainer(case)
    for _ in range(case.spec.steps):
        trainer.train_step()
    return trainer.outputs()


def checkpoint(case: Case, out: Path) -> dict[str, torch.Tensor]:
    first = Trainer(case)
    for _ in range(case.spec.steps // 2):
        first.train_step()
    path = out / "ckpt" / "state.safetensors"
    first.save(path)
    del first
    resumed = Trainer.load(case, path)
    while resumed.step < case.spec.steps:
        resumed.train_step()
    return resumed.outputs()


def run_probe(name: str, case: Case, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    make_deterministic()
    t0 = time.perf_counter()
    if name == "checkpoint":
        tensors = checkpoint(case, out)
    else:
        tensors = {"forward": forward, "backward": backward, "steps": steps}[name](case)
    if case.spec.device == "cuda":
        torch.cuda.synchronize()
    metrics = {"probe": name, "stack": "torch", "time_s": time.perf_counter() - t0,
               "device": case.spec.device, "dtype": case.spec.dtype}
    if "loss" in tensors:
        metrics["loss"] = float(tensors["loss"])
    if "losses" in tensors:
        metrics["losses"] = [float(x) for x in tensors["losses"]]
    return tensors, metrics
