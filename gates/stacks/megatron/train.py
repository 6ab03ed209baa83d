"""Training megatron-core's way: its DistributedDataParallel (fp32 gradient buffers), its optimizer
(`get_megatron_optimizer`: fp32 master weights in Float16OptimizerWithFloat16Params for bf16, its
DistributedOptimizer when DP > 1), its gradient clipping and grad norm.

What is ours, and why:
- the learning rate and weight decay of each step are written into the optimizer's param groups before
  it steps (`lr * lr_mult`, `weight_decay * wd_mult`, as Megatron's OptimizerParamScheduler writes them),
  with the case's schedule (`gates.stacks.torch_ref.optim.lr_at`): Megatron's scheduler cannot express
  every case schedule exactly (its warm-up counts from step 0, the case's from 1);
- the loss is the global token mean (sum of token CE over the global batch / count of labels != -100):
  each rank back-propagates `local_sum * dp / global_count`, and Megatron's DDP averages over DP;
- initial fp32 master weights are set from the case's fp32 weights (as loading a Megatron checkpoint
  restores them), not from the bf16-rounded model copy.
Weight decay: Megatron's default groups already exclude 1-D parameters (the norm weights), as the
reference does. Adam is torch.optim.AdamW, Megatron's fallback without TE / apex.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from gates.case import OptimizerSpec
from gates.model_config import MiniCPMConfig
from gates.stacks.megatron.model import Attention, build_gpt, causal_mask, position_ids

IGNORE_INDEX = -100


def megatron_loss_sum(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Summed token CE through Megatron's own loss path: GPTModel(labels=...) returns per-token losses
    (b, s) in fp32; ignored labels are masked as Megatron's pretrain_gpt does with its loss mask."""
    b, s = ids.shape
    mask = labels != IGNORE_INDEX
    losses = model(ids, position_ids(b, s, ids.device), causal_mask(s, ids.device), labels=labels.clamp(min=0))
    return (losses.float() * mask).sum()


class MegatronTrainer:
    """GPTModel (MiniCPM hooks) wrapped in Megatron's Float16Module (bf16) and DDP, plus its optimizer."""

    def __init__(self, cfg: MiniCPMConfig, attention: Attention, dtype: torch.dtype, device: torch.device | str,
                 opt: OptimizerSpec, weights: dict[str, Tensor] | None = None, with_optimizer: bool = True):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg, self.opt_spec, self.device = cfg, opt, device
        self.dp = torch.distributed.get_world_size()
        model, self.gpt, self.scaling = build_gpt(cfg, attention, dtype, device, weights)
        distributed = with_optimizer and self.dp > 1
        self.ddp = DistributedDataParallel(
            self.gpt.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                          use_distributed_optimizer=distributed),
            model,
        )
        self.optimizer = None
        if with_optimizer:
            config = OptimizerConfig(
                optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_eps=opt.eps, clip_grad=opt.grad_clip,
                bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=distributed,
                decoupled_weight_decay=True,
            )
            self.optimizer = get_megatron_optimizer(config, [self.ddp], use_gloo_process_groups=False)
            if weights is not None:
                self.set_master_weights(weights)

    # ---- one step -------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[tuple[Tensor, Tensor]], global_count: int) -> Tensor:
        """Accumulate the gradient of the global token-mean loss over this rank's micro batches into
        Megatron's fp32 grad buffers and reduce it over DP; returns the global loss (fp32 scalar)."""
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        local = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, (ids, labels) in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                total = megatron_loss_sum(self.ddp, ids, labels)
                (total * (self.dp / global_count)).backward()
            local += total.detach()
        self.ddp.finish_grad_sync()
        if self.dp > 1:
            torch.distributed.all_reduce(local)
        return local / global_count

    def optimizer_step(self, lr: float) -> float:
        """Set this step's lr / weight decay, then Megatron's own optimizer step (a ChainedOptimizer: grad
        norm over all groups, clip by it when clip_grad > 0, Adam step); returns the norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.opt_spec.weight_decay * group.get("wd_mult", 1.0)
        ok, norm, _ = self.optimizer.step()  # Megatron's: prepare grads, norm, clip, step, copy to model
        if not ok:
            raise FloatingPointError("Megatron's optimizer skipped the step (inf/nan in the gradients)")
        return float(norm)

    # ---- views by Megatron parameter name ---------------------------------------------------------
    def main_grads(self) -> dict[str, Tensor]:
        """fp32 gradient of every parameter after `forward_backward` (DDP's main_grad buffers)."""
        return {n: p.main_grad.detach().clone() for n, p in self.gpt.named_parameters()}

    def _master_pairs(self) -> Iterator[tuple[Tensor, Tensor, slice | None]]:
        """(model param, its fp32 master (shard), the flat range of the shard or None for all of it)."""
        for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            yield from self._pairs_of(o)

    @staticmethod
    def _pairs_of(o) -> Iterator[tuple[Tensor, Tensor, slice | None]]:
        if hasattr(o, "shard_fp32_from_float16_groups"):  # DistributedOptimizer
            for models, mains in [(o.model_float16_groups, o.shard_fp32_from_float16_groups),
                                  (o.model_fp32_groups, o.shard_fp32_groups)]:
                for mg, sg in zip(models, mains):
                    for p, m in zip(mg, sg):
                        r = o._get_model_param_range_map(p)["param"]
                        yield p, m, slice(r.start, r.end)
        elif hasattr(o, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
            for mg, sg in zip(o.float16_groups, o.fp32_from_float16_groups):
                for p, m in zip(mg, sg):
                    yield p, m, None
            for g in o.fp32_from_fp32_groups:
                for p in g:
                    yield p, p, None
        else:  # FP32Optimizer: the parameters are the master weights
            for g in o.param_groups:
                for p in g["params"]:
                    yield p, p, None

    def set_master_weights(self, hf_weights: dict[str, Tensor]) -> None:
        from gates.stacks.megatron.convert import hf_to_megatron

        by_param = {p: n for n, p in self.gpt.named_parameters()}
        full = hf_to_megatron(hf_weights, self.cfg)
        with torch.no_grad():
            for p, m, r in self._master_pairs():
                src = full[by_param[p]].to(m.device, torch.float32)
                m.copy_(src.view(-1)[r] if r is not None else src)

    def master_weights(self) -> dict[str, Tensor]:
        """Full fp32 master weights by Megatron name (shards gathered over DP)."""
        by_param = {p: n for n, p in self.gpt.named_parameters()}
        out: dict[str, Tensor] = {}
        sharded = False
        for p, m, r in self._master_pairs():
            if r is None:
                out[by_param[p]] = m.detach().float().clone()
            else:
                sharded = True
                full = out.setdefault(by_param[p], torch.zeros(p.numel(), dtype=torch.float32, device=m.device))
                full[r] = m.detach().float().view(-1)
        if sharded:
            for n, p in self.gpt.named_parameters():
                flat = out.setdefault(n, torch.zeros(p.numel(), dtype=torch.float32, device=p.device))
                torch.distributed.all_reduce(flat)  # each element is owned by exactly one rank
                out[n] = flat.view(p.shape)
        return out
