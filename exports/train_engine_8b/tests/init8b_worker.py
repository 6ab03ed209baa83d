"""`--init-from` and fresh inits on spawned gloo ranks: each rank builds the reduced 8B's Trainer from a HF
directory through the lazy reader (minicpm/init_from.py `open_init`, core/weights.py `local_masters`), or from
a fresh init (minicpm/init.py `FreshWeights`), and writes what the tests check.

Per rank, `out / f"{name}-rank{r}.json"`: the parameters whose local values or AdamW masters differ (bitwise)
from this rank's shard of the whole read (`load_init`, every weight read whole) or of the whole fresh init
(`init_weights`), the bytes the reader says it read (`bytes_read`), the bytes an independent wrapper around
safetensors' `safe_open` saw materialized (every tensor `get_tensor` / `get_slice(...)[...]` returned), and the
EngineError message if building failed. A `peak` job writes the peak RSS growth of drawing this rank's masters
and of the whole fresh init instead.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
import torch.multiprocessing as mp

import train_engine_8b.minicpm.init_from as init_from
from train_engine_8b import config
from train_engine_8b.build import Layout, build_trainer
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.errors import EngineError
from train_engine_8b.core.tensor_parallel import local, shard_of
from train_engine_8b.core.weights import local_masters
from train_engine_8b.minicpm.config import hf_param_shapes
from train_engine_8b.minicpm.init import FreshWeights, init_weights
from train_engine_8b.model import build_model
from train_engine_8b.model_config import preset
from train_engine_8b.parallelize import parallelize_model
from trainer8b_worker import start_rank


class _Counted:
    """safe_open, counting the bytes of every tensor it hands out (the test's own count, not the reader's)."""

    seen = 0

    def __init__(self, path, framework="pt", **kw):
        self._h = _SAFE_OPEN(path, framework=framework, **kw)

    def __enter__(self):
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)

    def keys(self):
        return self._h.keys()

    def get_tensor(self, name):
        return self._count(self._h.get_tensor(name))

    def get_slice(self, name):
        sl, count = self._h.get_slice(name), self._count

        class Slice:
            get_shape, get_dtype = sl.get_shape, sl.get_dtype

            def __getitem__(self, index):
                return count(sl[index])

        return Slice()

    @classmethod
    def _count(cls, t: torch.Tensor) -> torch.Tensor:
        cls.seen += t.numel() * t.element_size()
        return t


_SAFE_OPEN = init_from.safe_open


def engine_config(tp: int, model=None):
    return config.build(model=model or preset("minicpm4-8b-reduced"),
                        train=dict(num_steps=2, global_batch_size=2, micro_batch_size=1, seq_length=32),
                        optim=dict(lr=1e-2, warmup_steps=1), runtime=dict(device="cpu", tp=tp, compile=False))


def _differ(trainer, full: dict, dtype: torch.dtype) -> dict:
    """The parameters and AdamW masters that differ (bitwise) from this rank's shards of `full`."""
    opt = trainer.optimizer
    return {"params_differ": [n for n, p in trainer.model.named_parameters()
                              if not torch.equal(local(p), shard_of(full[n], p).to(dtype))],
            "masters_differ": [n for n, p, m in zip(opt.names, opt.params, opt.master)
                               if m.dtype != torch.float32 or not torch.equal(m, shard_of(full[n], p))],
            "local_numel": {n: local(p).numel() for n, p in trainer.model.named_parameters()}}


def run_fresh(job: dict, ctx: DistContext) -> dict:
    """job: {name, fresh: True, tp[, dtype]}: build the Trainer from a fresh init (train.init_std, train.seed)."""
    cfg = engine_config(job["tp"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.get("dtype", "float32")]
    trainer = build_trainer(cfg, ctx, dtype=dtype)
    return {"rank": ctx.rank} | _differ(trainer, init_weights(cfg.model, cfg.train.init_std, cfg.train.seed), dtype)


def _hwm_growth(make) -> int:
    """Bytes the peak RSS (VmHWM, reset first) rose above the RSS before `make()`, with what it made alive."""
    def kb(key: str) -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = kb("VmRSS:")
    made = make()
    peak = kb("VmHWM:")
    del made
    return (peak - before) * 1024


def run_peak(job: dict, ctx: DistContext) -> dict:
    """job: {name, peak: True, tp, model: preset updates, block}: on the parallelized model (its parameters
    allocated), the peak RSS growth of drawing this rank's masters (build_trainer's fresh init) and then of the
    whole init that it replaced; each held until measured."""
    cfg = engine_config(job["tp"], preset("minicpm4-8b-reduced").model_copy(update=job["model"]))
    t = cfg.train
    model = parallelize_model(build_model(cfg.model), Layout.of(cfg, ctx).mesh).to_empty(device="cpu")
    for p in model.parameters():
        local(p).zero_()  # resident before measuring, as build_trainer's parameters are once written
    params = dict(model.named_parameters())
    try:
        fresh = _hwm_growth(lambda: local_masters(FreshWeights(cfg.model, t.init_std, t.seed, job["block"]), params))
        whole = _hwm_growth(lambda: init_weights(cfg.model, t.init_std, t.seed))
    except OSError as e:  # no /proc/self/clear_refs to reset the peak with
        return {"rank": ctx.rank, "error": f"cannot measure: {e}"}
    return {"rank": ctx.rank, "fresh_bytes": fresh, "whole_bytes": whole,
            "model_bytes": sum(4 * torch.Size(s).numel() for s in hf_param_shapes(cfg.model).values())}


def run_job(job: dict, ctx: DistContext, out: Path) -> dict:
    """job: {name, dir, tp[, dtype]}: build the Trainer from job["dir"] through the lazy reader."""
    d = Path(job["dir"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.get("dtype", "float32")]
    res: dict = {"rank": ctx.rank}
    init_from.safe_open = _Counted
    _Counted.seen = 0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        cfg, source = init_from.open_init(d)
        trainer = build_trainer(engine_config(job["tp"], cfg), ctx, source, dtype=dtype)
    except EngineError as e:
        res["error"] = str(e)
        return res
    finally:
        init_from.safe_open = _SAFE_OPEN
    res |= {"bytes_read": source.bytes_read, "bytes_seen": _Counted.seen,
            "maxrss_growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0}
    _, full = init_from.load_init(d)  # every weight read whole: what each rank's shard is cut from
    return res | _differ(trainer, full, dtype)


def _rank(rank: int, world: int, port: int, jobs: list[dict], out: str) -> None:
    ctx = start_rank(rank, world, port)
    try:
        for job in jobs:
            if job.get("peak"):
                res = run_peak(job, ctx)
            elif job.get("fresh"):
                res = run_fresh(job, ctx)
            else:
                res = run_job(job, ctx, Path(out))
            (Path(out) / f"{job['name']}-rank{rank}.json").write_text(json.dumps(res))
        ctx.barrier()  # no rank tears its group down while another still works (as pretrain does)
    finally:
        ctx.close()


def spawn(jobs: list[dict], world: int, out: Path, port: int) -> dict[str, list[dict]]:
    """Run `jobs` in order on `world` spawned ranks; returns each job's per-rank results."""
    mp.spawn(_rank, args=(world, port, jobs, str(out)), nprocs=world, join=True)
    return {job["name"]: [json.loads((out / f"{job['name']}-rank{r}.json").read_text()) for r in range(world)]
            for job in jobs}
