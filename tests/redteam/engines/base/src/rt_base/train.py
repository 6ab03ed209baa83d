"""Case loading, data-parallel training steps, AdamW, checkpoints: the probe answers of rt_base, and the
step `pretrain` runs (rt_base/pretrain.py builds a Case from its options and drives the same Trainer)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rt_base import ckpt
from rt_base.flaws import Flaws
from rt_base.model import Model, loss_sum

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Case:
    """spec (dict, case.json's layout), cfg (= spec["model"]), initial weights, batches (steps, world, rows, seq)."""

    def __init__(self, d: Path | None = None, spec: dict | None = None, weights: dict | None = None,
                 batches: dict | None = None):
        if d is not None:
            spec = json.loads((d / "case.json").read_text())
            weights = load_file(str(d / "weights.safetensors"))
            batches = load_file(str(d / "batches.safetensors"))
        self.spec, self.weights, self.batches = spec, weights, batches
        self.cfg = self.spec["model"]
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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def buckets(grads: dict[str, torch.Tensor], bucket_mb: float) -> list[list[str]]:
    """Gradient buckets as DDP forms them: parameters in reverse module order (the last layers' gradients
    are ready first), a bucket closed once it holds >= bucket_mb MiB."""
    limit, out, cur, size = bucket_mb * 2**20, [], [], 0
    for name in reversed(list(grads)):
        cur.append(name)
        size += grads[name].numel() * grads[name].element_size()
        if size >= limit:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def lr_at(t: int, total: int, opt: dict, sched: dict, flaws: Flaws = Flaws(), pretrain: bool = False) -> float:
    lr, warm = opt["lr"], sched["warmup_steps"]
    if pretrain and flaws.pretrain_constant_lr:
        return lr
    if t <= warm:
        return lr * t / warm
    if sched["kind"] == "constant":
        return lr
    if sched["kind"] == "cosine":
        floor = 0.0 if flaws.cosine_to_zero else opt["min_lr"]
        prog = min(1.0, (t - warm) / max(1, total - warm))
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * prog))
    explicit = None if flaws.wsd_ignores_decay_steps else sched.get("decay_steps")
    decay = explicit or max(1, math.ceil(0.1 * total))
    start = total - decay
    return lr if t <= start else lr + (opt["min_lr"] - lr) * min(1.0, (t - start) / decay)


class AdamW:
    """torch.optim.AdamW's arithmetic (decoupled decay on matrices), without torch.optim: building a
    torch.optim optimizer imports torch._dynamo, seconds per process."""

    def __init__(self, params: dict[str, torch.Tensor], opt: dict, skip: str | None = None, decay_all: bool = False):
        self.params, self.o = params, opt
        self.decay = {k for k, v in params.items() if (v.ndim >= 2 or decay_all) and k != skip}
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


class Trainer:
    """One model replica, its master weights and AdamW state. `pretrain` selects the production path:
    bucketed gradient all-reduce (`bucket_mb`), checkpoints in pretrain form, and the flaws that only
    the training path has."""

    def __init__(self, case: Case, flaws: Flaws, dist_: Dist, pretrain: bool = False, bucket_mb: float | None = None,
                 lr_scale: float = 1.0):
        self.case, self.flaws, self.dist, self.pretrain = case, flaws, dist_, pretrain
        self.bucket_mb, self.lr_scale = bucket_mb, lr_scale
        self.model = Model(case.cfg, flaws, case.dtype, case.device)
        self.model.load(case.weights)
        self.master = {k: v.to(case.device, case.master).clone().requires_grad_(False) for k, v in case.weights.items()}
        self.opt = AdamW(self.master, case.spec["optimizer"], skip=flaws.skip_weight_decay,
                         decay_all=pretrain and flaws.pretrain_decays_norms)
        self.rng = torch.Generator().manual_seed(case.spec["seed"] + 1234)  # micro-batch order
        self.step = 0
        self.data_position = 0  # index of the next batch to train on
        self.history: dict[str, list[float]] = {"losses": [], "grad_norms": [], "lrs": []}
        self.rank_history: dict[str, list] = {"loss_sums": [], "valid_tokens": []}  # per-rank outputs
        self.num_buckets = len(buckets(self.master, bucket_mb)) if bucket_mb is not None else 0  # logged by pretrain
        self.valid_tokens = 0

    def grads(self, batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's share of batch `batch`'s gradient of the global token-mean loss, all-reduced."""
        c, spec, d = self.case, self.case.spec, self.dist
        ids = c.batches["input_ids"][batch, d.rank].to(c.device)  # (rows_per_rank, S)
        labels = c.batches["labels"][batch, d.rank].to(c.device)
        mbs, ga = spec["micro_batch_size"], spec["grad_accum"]
        local = torch.tensor(float((labels != -100).sum()), dtype=c.master, device=c.device)
        count = d.sum_(local.clone())
        if self.flaws.lazy_ranks and d.world > 1:  # rank 0 takes every rank's rows, the others none
            ids = c.batches["input_ids"][batch].flatten(0, 1)[: mbs * ga * d.world if d.rank == 0 else 0].to(c.device)
            labels = c.batches["labels"][batch].flatten(0, 1)[: ids.shape[0]].to(c.device)
            ga = ga * d.world if d.rank == 0 else 0
        self.valid_tokens = int(count)  # the global batch's, logged by pretrain
        grads = {k: torch.zeros_like(v) for k, v in self.master.items()}
        loss = torch.zeros((), dtype=c.master, device=c.device)
        self.rank_sum, self.rank_count = 0.0, int((labels != -100).sum())  # the rows this rank trained on
        for j in torch.randperm(ga, generator=self.rng).tolist():  # RNG-drawn accumulation order
            sl = slice(j * mbs, (j + 1) * mbs)
            total = loss_sum(self.model(ids[sl]), labels[sl])
            denom = local * d.world if self.flaws.dp_mean_of_means else count
            (total / denom).backward()
            loss += total.detach().to(c.master) / denom
            self.rank_sum += float(total.detach())
            for k, p in self.model.p.items():
                grads[k] += p.grad.to(c.master)
                p.grad = None
        if self.flaws.drop_last_rank_at_world == d.world and d.rank == d.world - 1:
            for g in grads.values():
                g.zero_()
        self.reduce_(grads)
        d.sum_(loss)
        if self.flaws.zero_grad:
            grads[self.flaws.zero_grad].zero_()
        return grads, loss

    def reduce_(self, grads: dict[str, torch.Tensor]) -> None:
        d = self.dist
        if d.world == 1 or (self.pretrain and self.flaws.pretrain_no_dp_reduce):
            return
        if self.bucket_mb is None:  # probes: one all-reduce per parameter
            for g in grads.values():
                d.sum_(g)
            return
        groups = buckets(grads, self.bucket_mb)
        for i, names in enumerate(groups):
            if i > 0 and self.pretrain and self.flaws.reduce_first_bucket_only:
                break
            flat = d.sum_(torch.cat([grads[n].flatten() for n in names]))
            for n, part in zip(names, flat.split([grads[n].numel() for n in names])):
                grads[n].copy_(part.view_as(grads[n]))

    def train_step(self) -> None:
        spec = self.case.spec
        grads, loss = self.grads(self.data_position)
        for k, p in self.master.items():
            p.grad = grads[k]
        params = list(self.master.values())
        clip = spec["optimizer"]["grad_clip"]
        if clip > 0 and not (self.pretrain and self.flaws.pretrain_ignores_grad_clip):
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        lr = lr_at(self.step + 1, spec["steps"], spec["optimizer"], spec["schedule"], self.flaws, self.pretrain)
        self.opt.step(lr * self.lr_scale)
        with torch.no_grad():
            for k, p in self.model.p.items():
                p.copy_(self.master[k])
        self.step += 1
        self.data_position += 1
        for key, v in (("losses", loss), ("grad_norms", norm), ("lrs", lr)):
            self.history[key].append(float(v))
        self.rank_history["loss_sums"].append(self.rank_sum)
        self.rank_history["valid_tokens"].append(self.rank_count)

    def rank_outputs(self) -> dict[str, torch.Tensor]:
        return {"loss_sums": torch.tensor(self.rank_history["loss_sums"], dtype=torch.float64),
                "valid_tokens": torch.tensor(self.rank_history["valid_tokens"], dtype=torch.int64)}

    def outputs(self) -> dict[str, torch.Tensor]:
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()}
        if self.flaws.echo_inputs:
            return out | {f"weight.{k}": v for k, v in self.case.weights.items()}
        return out | {f"weight.{k}": v.detach() for k, v in self.master.items()}

    # ----- checkpoints -----------------------------------------------------------------------------
    def save(self, d: Path, pointer: Path | None = None) -> Path:
        """This replica's full state as a checkpoint directory (ckpt.py). Called by rank 0 only: every
        rank holds the same weights, moments and generator state."""
        drop = self.pretrain and self.flaws.resume_drops_moments
        moments = {f"exp_avg.{k}": (torch.zeros_like(v) if drop else v) for k, v in self.opt.m.items()}
        moments |= {f"exp_avg_sq.{k}": (torch.zeros_like(v) if drop else v) for k, v in self.opt.v.items()}
        files = {ckpt.MODEL: self.master, ckpt.OPTIM: moments}
        if not self.flaws.drop_rng_state:
            files[ckpt.RNG] = {"micro_batch_order": self.rng.get_state()}
        state = {"kind": "pretrain" if self.pretrain else "probe", "step": self.step, "adam_step": self.opt.t,
                 "data_position": self.data_position, "model": self.case.cfg, "world_size": self.dist.world,
                 "history": self.history}
        slow = self.pretrain and self.flaws.non_atomic_save
        return ckpt.write(d, files, state, pointer, atomic=not slow, pause=0.25 if slow else 0.0)

    def load(self, d: Path) -> None:
        state, files = ckpt.read(d)
        self.step, self.opt.t = state["step"], state["adam_step"]
        self.data_position = state["data_position"]
        self.history = state["history"]
        if self.pretrain and self.flaws.resume_restarts_data:
            self.data_position = 0
        if ckpt.RNG in files:
            self.rng.set_state(files[ckpt.RNG]["micro_batch_order"])
        if self.pretrain and self.flaws.resume_never_reloads:
            return  # the step, data position and RNG only: weights and moments stay the initial ones
        with torch.no_grad():
            for k, v in files[ckpt.MODEL].items():
                self.master[k].copy_(v)
                self.model.p[k].copy_(v)
            for k in self.master:
                self.opt.m[k].copy_(files[ckpt.OPTIM][f"exp_avg.{k}"])
                self.opt.v[k].copy_(files[ckpt.OPTIM][f"exp_avg_sq.{k}"])
