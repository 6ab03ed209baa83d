"""Runs the parallel model against the plain one in spawned gloo processes; the tests assert on what it measures.

`spawn(jobs, world, tmp)` starts `world` processes; each builds every job's ("dp", "tp") mesh, runs one
step of the parallel model (forward, token-sum loss, backward, DP gradient sum, AdamW) and the same step
of the plain model on the whole batch, and rank 0 returns, per job, the largest differences (relative to the
plain run's largest magnitude) and the padding row's gradient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from train_engine_8b.minicpm.init import init_weights
from train_engine_8b.model import MiniCPM, build_model
from train_engine_8b.model_config import preset
from train_engine_8b.parallelize import (GradSync, ParallelDims, ParallelError, local_batch, parallelize_model,
                                        train_context)
from train_engine_8b.state_dict_adapter import load_hf, to_hf

DTYPES = {"float64": torch.float64, "float32": torch.float32}
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def spawn(jobs: list[dict], world: int, tmp: Path) -> dict[str, dict]:
    """jobs: {name, dp, tp, dtype, seq, seed[, recompute, compile]}, or {name, dp, tp, expect_error: True[, model
    (config updates), seq]}. Returns {name: measurements} from rank 0; each compared job also leaves
    tmp / f"{name}.pt": the parallel model's HF state dict after the step, a batch and its logits."""
    out = tmp / "result.json"
    mp.spawn(_main, args=(world, str(tmp / "rendezvous"), jobs, str(tmp)), nprocs=world, join=True)
    return json.loads(out.read_text())


def _main(rank: int, world: int, rendezvous: str, jobs: list[dict], tmp: str) -> None:
    torch.set_num_threads(1)  # world processes share the test machine's cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        kinds = {"compare": _compare, "refusal": _refusal, "reshard": _reshard, "shapes": _shapes}
        results = {job["name"]: kinds[job.get("kind", "compare")](job, world, Path(tmp)) for job in jobs}
        if rank == 0:
            (Path(tmp) / "result.json").write_text(json.dumps(results, indent=1))
    finally:
        dist.destroy_process_group()


def _inputs(cfg, job: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The same fresh random weights (norms too, padding row zero) and batch on every rank, from the job's seed."""
    dtype = DTYPES[job["dtype"]]
    gen = torch.Generator().manual_seed(job["seed"])
    weights = {k: (v + 0.1 * torch.randn(v.shape, generator=gen) if v.ndim == 1 else v).to(dtype)
               for k, v in init_weights(cfg, init_std=0.1, seed=job["seed"]).items()}
    ids = torch.randint(0, cfg.vocab_size, (4, job["seq"]), generator=gen)
    ids[:, ::5] = cfg.pad_token_id  # the padding row is looked up: its gradient must still be zero
    labels = torch.randint(0, cfg.vocab_size, (4, job["seq"]), generator=gen)
    labels[0, :3] = -100
    return weights, ids, labels


def _step(model, opt, ids, labels, count, context, sync) -> float:
    with context:
        loss = model.loss_sum(ids, labels) / count
        loss.backward()
    sync()
    value = loss.full_tensor() if isinstance(loss, DTensor) else loss
    return value.detach().clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _compare(job: dict, world: int, tmp: Path) -> dict:
    cfg = preset("minicpm4-8b-reduced")
    dtype = DTYPES[job["dtype"]]
    weights, ids, labels = _inputs(cfg, job)
    count = int((labels != -100).sum())

    ref = MiniCPM(cfg).to(dtype)
    load_hf(ref, cfg, weights)
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    ref_loss = _step(ref, ref_opt, ids, labels, count, torch.enable_grad(), lambda: None)
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    ref_opt.step()
    ref_after = to_hf(ref)

    dims = ParallelDims(dp=job["dp"], tp=job["tp"])
    dims.check(cfg, world)
    mesh = dims.build_mesh("cpu")
    model = parallelize_model(build_model(cfg), mesh, recompute=job.get("recompute", "none"),
                              compile=job.get("compile", False))
    model = model.to_empty(device="cpu").to(dtype)
    load_hf(model, cfg, weights)
    loaded = to_hf(model)
    round_trip_exact = all(torch.equal(loaded[k], weights[k]) for k in weights) and loaded.keys() == weights.keys()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    loss = _step(model, opt, local_batch(ids, mesh), local_batch(labels, mesh), count, train_context(mesh),
                 GradSync(model, mesh))
    if dims.dp > 1:  # each DP rank's loss is its rows' share of the global mean
        dist.all_reduce(loss, group=mesh["dp"].get_group())
    grads = {k: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for k, p in model.named_parameters()}
    opt.step()
    after = to_hf(model)
    with torch.no_grad(), train_context(mesh):
        logits = model(ids)
        logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    if dist.get_rank() == 0:
        torch.save({"state": after, "ids": ids, "logits": logits}, tmp / f"{job['name']}.pt")

    pad = cfg.pad_token_id
    grad_diff = {k: _rel(grads[k], ref_grads[k]) for k in ref_grads}
    step_diff = {k: _rel(after[k] - weights[k], ref_after[k] - weights[k]) for k in ref_after}
    return {
        "round_trip_exact": round_trip_exact,
        "sharded": sorted(k for k, p in model.named_parameters() if isinstance(p, DTensor)),
        "loss": float(ref_loss), "loss_rel_diff": abs(float(loss - ref_loss)) / abs(float(ref_loss)),
        "grad_rel_diff": grad_diff, "max_grad_rel_diff": max(grad_diff.values()),
        "step_rel_diff": step_diff, "max_step_rel_diff": max(step_diff.values()),
        "pad_row_grad_nonzero": int(torch.count_nonzero(grads["model.embed_tokens.weight"][pad])),
        "pad_row_moved": int(torch.count_nonzero(after["model.embed_tokens.weight"][pad])),
        "ref_pad_row_grad_nonzero": int(torch.count_nonzero(ref_grads["model.embed_tokens.weight"][pad])),
        "nonpad_rows_with_grad": int((grads["model.embed_tokens.weight"].abs().sum(1) > 0).sum()),
        "local_q_proj_rows": int(_local(model.model.layers[0].self_attn.q_proj.weight).shape[0]),
        "local_k_proj_rows": int(_local(model.model.layers[0].self_attn.k_proj.weight).shape[0]),
    }


def _refusal(job: dict, world: int, tmp: Path) -> dict:
    """The error parallelize_model raises for the job's model (config updates), or the forward for its sequence."""
    cfg = preset("minicpm4-8b-reduced").model_copy(update=job.get("model", {}))
    mesh = ParallelDims(dp=job["dp"], tp=job["tp"]).build_mesh("cpu")
    try:
        model = parallelize_model(build_model(cfg), mesh, recompute=job.get("recompute", "none"),
                                  compile=job.get("compile", False)).to_empty(device="cpu")
        model(torch.randint(0, cfg.vocab_size, (2, job.get("seq", 32))))
    except ParallelError as e:
        return {"error": str(e)}
    return {"error": None}


def _reshard(job: dict, world: int, tmp: Path) -> dict:
    """Save a model laid out as layouts[0] through torch.distributed.checkpoint, load it into one laid out as
    layouts[1] (zeroed first): whether every gathered weight comes back bit for bit."""
    cfg = preset("minicpm4-8b-reduced")
    weights = init_weights(cfg, init_std=0.1, seed=job["seed"])
    path = tmp / f"{job['name']}-dcp"
    models = []
    for dp, tp in job["layouts"]:
        mesh = ParallelDims(dp=dp, tp=tp).build_mesh("cpu")
        models.append(parallelize_model(build_model(cfg), mesh).to_empty(device="cpu"))
    src, dst = models
    load_hf(src, cfg, weights)
    dcp.save(src.state_dict(), checkpoint_id=path)
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    dcp.load(dst.state_dict(), checkpoint_id=path)
    got = to_hf(dst)
    return {"exact": all(torch.equal(got[k], weights[k]) for k in weights),
            "dst_sharded": sum(isinstance(p, DTensor) for p in dst.parameters())}


def _shapes(job: dict, world: int, tmp: Path) -> dict:
    """A preset built on meta and parallelized (no memory, no forward): {name: [global shape, local shape]}."""
    cfg = preset(job["preset"])
    mesh = ParallelDims(dp=job["dp"], tp=job["tp"]).build_mesh("cpu")
    model = parallelize_model(build_model(cfg), mesh)
    return {k: [list(p.shape), list(_local(p).shape)] for k, p in model.named_parameters()}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


if __name__ == "__main__":  # by hand: python tests/tp8b_worker.py (prints the measurements)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        jobs = [dict(name="tp2", dp=1, tp=2, dtype=os.environ.get("DTYPE", "float64"), seq=32, seed=1)]
        print(json.dumps(spawn(jobs, 2, Path(d)), indent=1))
