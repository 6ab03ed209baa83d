"""Runner: the reference math in plain PyTorch with SDPA attention and fused AdamW, eager or compiled.

`python -m benchmarks.bench_torch --mode eager|compile ...` (arguments: benchmarks/runner.py).

The model is `gates.stacks.torch_ref.model.MiniCPM` with each layer's attention replaced by the same
projections + RoPE feeding `scaled_dot_product_attention` (causal, GQA via `enable_gqa`), as MEASURED.md's
rows: parameters and AdamW state in bf16 (`torch.optim.AdamW(fused=True)`), no fp32 master copy,
global-norm clipping at 1.0, loss = mean token CE in fp32. `compile` wraps the forward + loss in
`torch.compile` (default mode); backward and the optimizer run as PyTorch schedules them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.runner import parser, random_tokens, run, timed_steps
from gates.model_config import MiniCPMConfig
from gates.stacks.torch_ref import model as ref


class SdpaAttention(ref.Attention):
    """The reference attention with the score/softmax/value product done by SDPA."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n, self.d).transpose(1, 2)  # (B, n, S, d)
        k = self.k_proj(x).view(B, S, self.g, self.d).transpose(1, 2)  # (B, g, S, d)
        v = self.v_proj(x).view(B, S, self.g, self.d).transpose(1, 2)
        q, k = ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n != self.g)  # (B, n, S, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n * self.d))


def build(cfg: MiniCPMConfig, device: str, dtype: torch.dtype, seed: int) -> ref.MiniCPM:
    torch.manual_seed(seed)
    model = ref.MiniCPM(cfg)
    for layer in model.model.layers:
        sdpa = SdpaAttention(cfg)
        sdpa.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = sdpa
    with torch.no_grad():  # the reference's init (N(0, 0.02) matrices); norms stay 1
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["eager", "compile"], required=True)
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend; the CPU smoke test uses aot_eager (inductor's C++ build is slow on 2 cores)")
    args = p.parse_args()
    stack = "torch-eager" if args.mode == "eager" else "torch-compile"

    def body(cfg: MiniCPMConfig) -> dict:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        model = build(cfg, args.device, dtype, args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=args.device == "cuda")
        ids, labels = random_tokens(cfg, args.warmup + args.steps, args.micro_batch_size, args.seq_length, args.seed)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            logits = model(x)  # (B, S, V)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        fwd = torch.compile(loss_fn, backend=args.compile_backend) if args.mode == "compile" else loss_fn

        def step(i: int) -> float:
            loss = fwd(ids[i].to(args.device, non_blocking=True), labels[i].to(args.device, non_blocking=True))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        times, losses = timed_steps(step, args.warmup + args.steps, args.device)
        return {"step_times_s": times, "losses": losses,
                "settings": {"mode": args.mode, "compile_backend": args.compile_backend if args.mode == "compile" else None, "param_dtype": str(dtype), "optimizer": f"torch.optim.AdamW(fused={args.device == 'cuda'})",
                             "attention": "F.scaled_dot_product_attention(is_causal, enable_gqa)",
                             "master_weights": f"none: params and AdamW state in {dtype} (as MEASURED.md's rows on GPU)"}}

    run(args, stack, body)


if __name__ == "__main__":
    main()
