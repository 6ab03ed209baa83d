"""Case loading, data-parallel training steps, AdamW, checkpoints: the probe answers of rt_base."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rt_base.flaws import Flaws
from rt_base.model import Model, loss_sum

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Case:
    def __init__(self, d: Path):
        self.spec = json.loads((d / "case.json").read_text())
        self.cfg = self.spec["model"]
        self.weights = load_file(str(d / "weights.safetensors"))
        self.batches = load_file(str(d / "batches.safetensors"))
        self.dtype = DTYPES[self.spec["dtype"]]
        self.master = torch.float64 if self.spec["dtype"] == "float64" else torch.float32
        self.device = self.spec["device"]


class Dist:
    """rank / world from torchrun's environment; gloo on CPU, NCCL on GPU."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def lr_at(t: int, total: int, opt: dict, sched: dict) -> float:
    lr, warm = opt["lr"], sched["warmup_steps"]
    if t <= warm:
        return lr * t / warm
    if sched["kind"] == "constant":
        return lr
    if sched["kind"] == "cosine":
        prog = min(1.0, (t - warm) / max(1, total - warm))
        return opt["min_lr"] + (lr - opt["min_lr"]) * 0.5 * (1 + math.cos(math.pi * prog))
    decay = sched["decay_steps"] or max(1, math.ceil(0.1 * total))
    start = total - decay
    return lr if t <= start else lr + (opt["min_lr"] - lr) * min(1.0, (t - start) / decay)


class AdamW:
    """torch.optim.AdamW's arithmetic (decoupled decay on matrices), without torch.optim: building a
    torch.optim optimizer imports torch._dynamo, seconds per process."""

    def __init__(self, params: dict[str, torch.Tensor], opt: dict, skip: str | None = None):
        self.params, self.o = params, opt
        self.decay = {k for k, v in params.items() if v.ndim >= 2 and k != skip}
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        (b1, b2), eps, wd = self.o["betas"], self.o["eps"], self.o["weight_decay"]
        self.t += 1
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for k, p in self.params.items():
            if k in self.decay:
                p.mul_(1 - lr * wd)
            self.m[k].lerp_(p.grad, 1 - b1)
            self.v[k].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (self.v[k].sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(self.m[k], denom, value=-lr / bc1)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, sd: dict) -> None:
        for k in self.params:
            self.m[k].copy_(sd["m"][k])
            self.v[k].copy_(sd["v"][k])
        self.t = sd["t"]


class Trainer:
    def __init__(self, case: Case, flaws: Flaws, dist_: Dist):
        self.case, self.flaws, self.dist = case, flaws, dist_
        self.model = Model(case.cfg, flaws, case.dtype, case.device)
        self.model.load(case.weights)
        self.master = {k: v.to(case.device, case.master).clone().requires_grad_(False) for k, v in case.weights.items()}
        self.opt = AdamW(self.master, case.spec["optimizer"], skip=flaws.skip_weight_decay)
        self.rng = torch.Generator().manual_seed(case.spec["seed"] + 1234)  # micro-batch order
        self.step = 0
        self.history: dict[str, list[float]] = {"losses": [], "grad_norms": [], "lrs": []}

    def grads(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's share of step `step`'s gradient of the global token-mean loss, all-reduced."""
        c, spec, d = self.case, self.case.spec, self.dist
        ids = c.batches["input_ids"][step, d.rank].to(c.device)  # (rows_per_rank, S)
        labels = c.batches["labels"][step, d.rank].to(c.device)
        local = torch.tensor(float((labels != -100).sum()), dtype=c.master, device=c.device)
        count = d.sum_(local.clone())
        mbs, ga = spec["micro_batch_size"], spec["grad_accum"]
        grads = {k: torch.zeros_like(v) for k, v in self.master.items()}
        loss = torch.zeros((), dtype=c.master, device=c.device)
        for j in torch.randperm(ga, generator=self.rng).tolist():  # RNG-drawn accumulation order
            sl = slice(j * mbs, (j + 1) * mbs)
            total = loss_sum(self.model(ids[sl]), labels[sl])
            denom = local * d.world if self.flaws.dp_mean_of_means else count
            (total / denom).backward()
            loss += total.detach().to(c.master) / denom
            for k, p in self.model.p.items():
                grads[k] += p.grad.to(c.master)
                p.grad = None
        for g in grads.values():
            d.sum_(g)
        d.sum_(loss)
        if self.flaws.zero_grad:
            grads[self.flaws.zero_grad].zero_()
        return grads, loss

    def train_step(self) -> None:
        spec = self.case.spec
        grads, loss = self.grads(self.step)
        for k, p in self.master.items():
            p.grad = grads[k]
        params = list(self.master.values())
        clip = spec["optimizer"]["grad_clip"]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        lr = lr_at(self.step + 1, spec["steps"], spec["optimizer"], spec["schedule"])
        self.opt.step(lr)
        with torch.no_grad():
            for k, p in self.model.p.items():
                p.copy_(self.master[k])
        self.step += 1
        for key, v in (("losses", loss), ("grad_norms", norm), ("lrs", lr)):
            self.history[key].append(float(v))

    def outputs(self) -> dict[str, torch.Tensor]:
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()}
        if self.flaws.echo_inputs:
            return out | {f"weight.{k}": v for k, v in self.case.weights.items()}
        return out | {f"weight.{k}": v.detach() for k, v in self.master.items()}

    def save(self, d: Path) -> None:
        """Atomic: a temporary file, then a rename."""
        d.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "master": self.master, "opt": self.opt.state_dict(), "history": self.history}
        if not self.flaws.drop_rng_state:
            state["rng"] = self.rng.get_state()
        torch.save(state, d / "state.pt.tmp")
        os.replace(d / "state.pt.tmp", d / "state.pt")
        (d / "model.json").write_text(json.dumps(self.case.cfg))

    def load(self, d: Path) -> None:
        state = torch.load(d / "state.pt", weights_only=True)
        with torch.no_grad():
            for k, v in state["master"].items():
                self.master[k].copy_(v)
                self.model.p[k].copy_(v)
        self.opt.load_state_dict(state["opt"])
        self.step, self.history = state["step"], state["history"]
        if "rng" in state:
            self.rng.set_state(state["rng"])
