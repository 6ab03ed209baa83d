"""The `megatron` reference stacks: megatron-core 0.15.x GPTModel (local, non-TE layer spec) with the
MiniCPM4 scales applied by forward hooks, on GPU.

- `megatron`: the local spec as shipped (Megatron's unfused DotProductAttention);
- `megatron-sdpa`: the local spec with core attention swapped, through the module spec, for one that
  calls `torch.nn.functional.scaled_dot_product_attention` (causal, GQA).

Files: convert.py (HF <-> Megatron weights, pure torch), model.py (config, spec, hooks), sdpa.py (the
swapped core attention), train.py (Megatron's DDP + optimizer), probes.py, __main__.py (CLI).
"""
