"""Runs `build_trainer` runs of the reduced 8B in spawned gloo processes (or in this process alone) and writes
what the tests compare: per-step losses and gradient norms, and the whole master weights and moments after
the run (gathered over TP and ZeRO-1).

A job: {name, tp, zero1, steps: [first, last) of the run, save_at: steps after which to checkpoint into
`save_dir`, resume: a checkpoint directory to restore first, dtype, micro}. Every job trains on the same global
batches (`batches(seed)`), each DP rank its rows, from the same fresh weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from train_engine_8b import config
from train_engine_8b.build import Layout, build_trainer
from train_engine_8b.core import checkpoint as ckpt
from train_engine_8b.core.dist import DistContext
from train_engine_8b.model_config import preset

SEQ, ROWS, STEPS = 32, 4, 4
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def batches(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(STEPS, ROWS, SEQ) ids and labels; pad tokens in the input, ignored labels."""
    cfg = preset("minicpm4-8b-reduced")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, ROWS, SEQ), generator=gen)
    ids[:, :, ::7] = cfg.pad_token_id
    labels = torch.randint(0, cfg.vocab_size, (STEPS, ROWS, SEQ), generator=gen)
    labels[:, 0, :5] = -100
    return ids, labels


def engine_config(job: dict, seed: int):
    return config.build(
        model=preset("minicpm4-8b-reduced"),
        train=dict(num_steps=STEPS, global_batch_size=ROWS, micro_batch_size=job.get("micro", 1), seq_length=SEQ,
                   seed=seed),
        optim=dict(lr=1e-2, min_lr=1e-3, warmup_steps=1, zero1=job.get("zero1", False), grad_clip=job.get("clip", 1.0)),
        runtime=dict(device="cpu", tp=job["tp"], compile=False, recompute=job.get("recompute", "none")))


def run_job(job: dict, ctx: DistContext, seed: int, out: Path) -> None:
    """One job on this process's ranks; rank 0 writes out / f"{name}.pt"."""
    cfg = engine_config(job, seed)
    dtype = DTYPES[job.get("dtype", "float64")]
    layout = Layout.of(cfg, ctx)
    trainer = build_trainer(cfg, ctx, dtype=dtype, master_dtype=dtype, layout=layout)
    if job.get("resume"):
        ckpt.restore(ckpt.open_to_resume(Path(job["resume"]), ctx), trainer)
    # copies: without sharding these are the optimizer's own tensors, which the steps below update in place
    restored = {k: v.clone() for k, v in (trainer.optimizer.master_weights() | trainer.optimizer.state_tensors()).items()}
    ids, labels = batches(seed)
    dp = layout.dp
    losses, norms = [], []
    first, last = job["steps"]
    for step in range(first, last):
        rows = slice(dp.rank * ROWS // dp.world, (dp.rank + 1) * ROWS // dp.world)
        res = trainer.train_step(ids[step, rows], labels[step, rows])
        losses.append(float(res.loss))
        norms.append(float(res.grad_norm))
        if step + 1 in job.get("save_at", ()):
            ckpt.save(Path(job["save_dir"]), step + 1, trainer.optimizer, ctx, {}, {"layout": [dp.world, job["tp"]]})
    final = trainer.optimizer.master_weights() | trainer.optimizer.state_tensors()
    if ctx.is_main:
        torch.save({"losses": losses, "norms": norms, "final": final, "restored": restored,
                    "step_count": trainer.optimizer.step_count}, out / f"{job['name']}.pt")


def start_rank(rank: int, world: int, port: int) -> DistContext:
    """This spawned process as rank `rank` of a CPU (gloo) world on 127.0.0.1:`port`, with one intra-op thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share the test machine's cores
    return DistContext.start("cpu")


def _rank(rank: int, world: int, port: int, jobs: list[dict], seed: int, out: str) -> None:
    ctx = start_rank(rank, world, port)
    try:
        for job in jobs:
            run_job(job, ctx, seed, Path(out))
    finally:
        ctx.close()


def spawn(jobs: list[dict], world: int, seed: int, out: Path, port: int) -> dict[str, dict]:
    """Run `jobs` in order on `world` spawned ranks; returns each job's results."""
    mp.spawn(_rank, args=(world, port, jobs, seed, str(out)), nprocs=world, join=True)
    return {job["name"]: torch.load(out / f"{job['name']}.pt") for job in jobs}


def alone(jobs: list[dict], seed: int, out: Path) -> dict[str, dict]:
    """Run `jobs` in this process (one rank, no process group)."""
    for job in jobs:
        run_job(job, DistContext(), seed, out)
    return {job["name"]: torch.load(out / f"{job['name']}.pt") for job in jobs}
