"""Runner: megatron-core's GPTModel (local spec, MiniCPM hooks) trained Megatron's way, bf16.

`python -m benchmarks.bench_megatron --attention unfused|sdpa ...` (arguments: benchmarks/runner.py).
The training step is the `megatron` stack's own (gates/stacks/megatron/train.py): Float16Module, DDP with
fp32 grad buffers, Megatron's optimizer with fp32 master weights (torch AdamW without TE / apex), clip 1.0.
Weights come from Megatron's own init (N(0, 0.02)). Unsupported without CUDA or megatron-core.
"""

from __future__ import annotations

import torch

from benchmarks.runner import parser, random_tokens, run, timed_steps
from gates.case import OptimizerSpec
from gates.model_config import MiniCPMConfig


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--attention", choices=["unfused", "sdpa"], required=True)
    args = p.parse_args()
    stack = "megatron" if args.attention == "unfused" else "megatron-sdpa"

    def body(cfg: MiniCPMConfig) -> dict:
        from gates.stacks.megatron.model import unavailable_reason

        reason = unavailable_reason() if args.device == "cuda" else "the megatron stack runs on CUDA only"
        if reason:
            raise NotImplementedError(reason)
        import megatron.core

        from gates.stacks.megatron.model import init_parallel
        from gates.stacks.megatron.train import MegatronTrainer

        init_parallel(args.seed)
        device = torch.device("cuda", torch.cuda.current_device())
        opt = OptimizerSpec(lr=1e-4, min_lr=1e-5, weight_decay=0.1, grad_clip=1.0)
        trainer = MegatronTrainer(cfg, args.attention, torch.bfloat16, device, opt)
        ids, labels = random_tokens(cfg, args.warmup + args.steps, args.micro_batch_size, args.seq_length, args.seed)

        def step(i: int) -> float:
            batch = [(ids[i].to(device, non_blocking=True), labels[i].to(device, non_blocking=True))]
            loss = trainer.forward_backward(batch, ids[i].numel())
            trainer.optimizer_step(opt.lr)
            return loss

        times, losses = timed_steps(step, args.warmup + args.steps, args.device)
        return {"step_times_s": times, "losses": losses, "megatron_core": megatron.core.__version__,
                "settings": {"attention": args.attention, "layer_spec": "local (no Transformer Engine, no apex)",
                             "param_dtype": "torch.bfloat16 (Float16Module)", "master_weights": "fp32 (Megatron optimizer)",
                             "grad_buffers": "fp32 (Megatron DDP)", "optimizer": "torch.optim.AdamW via get_megatron_optimizer"}}

    run(args, stack, body)


if __name__ == "__main__":
    main()
