"""rt_base: a small, correct, self-contained eager engine that answers the forge probe contract and the
training contract (`pretrain`, `export-hf`, `dump-state`: the workspace's gates/train_contract.py).

It is the base of the red-team suite (tests/redteam): every red-team engine is this engine with one
`Flaws` field switched on. It imports nothing from the forge workspace. Its kernels deliberately
differ from the torch reference (SDPA attention, one fused QKV GEMM, F.rms_norm, torch's AdamW, an
RNG-drawn micro-batch accumulation order), so passing the gates proves they accept a correct engine
that is not the reference's code. `pretrain` drives the same Trainer (rt_base/pretrain.py) with
bucketed gradient all-reduces, atomic checkpoints and a JSONL log.
"""
