"""`pretrain`: build everything from an EngineConfig, train, log, checkpoint, resume.

Order matters for bad input: options, data, tokenizer and the checkpoint to resume are all checked
before the first byte is written, so a run that fails on its input leaves no checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time

import torch

from train_engine_0_5b import checkpoint as ckpt
from train_engine_0_5b import cuda_graph, runtime
from train_engine_0_5b.config import EngineConfig
from train_engine_0_5b.data import Data, Prefetcher, prepare, prepare_batches
from train_engine_0_5b.dist import DistContext
from train_engine_0_5b.errors import EngineError
from train_engine_0_5b.init_from import load_init
from train_engine_0_5b.metrics import StepLog, mfu
from train_engine_0_5b.model import build_model, compile_loss, init_weights
from train_engine_0_5b.ops.registry import resolve
from train_engine_0_5b.optim import AdamW, Schedule
from train_engine_0_5b.trainer import StepResult, Trainer

# Settings a resumed run must share with its checkpoint (anything else, e.g. num_steps, may change).
RESUME_KEYS = ("model", "seq_length", "global_batch_size", "data_fingerprint", "tokenizer_fingerprint")


def _identity(cfg: EngineConfig, data: Data) -> dict:
    return {"model": json.loads(cfg.model.model_dump_json()), "seq_length": cfg.train.seq_length,
            "global_batch_size": cfg.train.global_batch_size, "data_fingerprint": data.fingerprint,
            "tokenizer_fingerprint": data.tokenizer.fingerprint if data.tokenizer is not None else None}


def _checkpoint_to_resume(cfg: EngineConfig, data: Data) -> ckpt.Checkpoint | None:
    save_dir = cfg.checkpoint.save_dir
    if save_dir is None:
        return None
    latest = ckpt.find_latest(save_dir)
    if latest is None:
        return None
    if not cfg.checkpoint.resume:
        raise EngineError(f"--save-dir {save_dir} already holds checkpoints (latest: {latest.name}); "
                          "pass --resume to continue from it, or choose another --save-dir")
    loaded = ckpt.load(latest)
    saved = {k: loaded.state.get("identity", {}).get(k) for k in RESUME_KEYS}
    diff = ckpt.mismatches(saved, _identity(cfg, data))
    if diff:
        raise EngineError(f"checkpoint {latest} was written by a different configuration; it cannot be resumed "
                          "with these options:\n  " + "\n  ".join(diff[:12]))
    return loaded


def _save(cfg: EngineConfig, ctx: DistContext, step: int, optimizer: AdamW, loader, data: Data, log: StepLog) -> None:
    rng, py_rng = runtime.gather_rng(ctx)
    master, optim_state = optimizer.master_weights(), optimizer.state_tensors()  # collective under ZeRO-1
    if ctx.is_main:
        state = {"identity": _identity(cfg, data), "config": json.loads(cfg.model_dump_json()),
                 "data": loader.cursor(step), "schedule": {"next_step": step + 1, "kind": cfg.optim.lr_schedule},
                 "world_size": ctx.world, "python_rng": py_rng, "torch": torch.__version__}
        path = ckpt.save(cfg.checkpoint.save_dir, step, master, optim_state, rng, state, data.tokenizer)
        log.print(f"saved checkpoint {path}")
    ctx.barrier()


def _restore(loaded: ckpt.Checkpoint, optimizer: AdamW, ctx: DistContext, log: StepLog) -> None:
    optimizer.load(loaded.master, loaded.optim, loaded.step)
    if loaded.state.get("world_size") == ctx.world:
        runtime.restore_rank_rng(loaded.rng, loaded.state["python_rng"], ctx)
    else:
        log.print(f"note: checkpoint written with {loaded.state.get('world_size')} ranks, resuming on {ctx.world}: "
                  "same data order, but not bit-identical (reduction order and RNG streams differ)")
    log.print(f"resumed from {loaded.path} at step {loaded.step}")


def run(cfg: EngineConfig) -> dict:
    """Train per `cfg`; returns a summary (rank 0's view). Raises EngineError on bad input."""
    device, dtype = cfg.runtime.resolved_device(), cfg.runtime.resolved_dtype()
    runtime.setup(device, cfg.runtime.resolved_deterministic())
    ctx = DistContext.start(device)
    try:
        return _train(cfg, ctx, dtype)
    finally:
        ctx.close()


def _train(cfg: EngineConfig, ctx: DistContext, dtype: torch.dtype) -> dict:
    t, o = cfg.train, cfg.optim
    accum = cfg.grad_accum(ctx.world)
    ops = resolve(cfg.ops, ctx.device.type, dtype)
    d = cfg.data
    if d.token_batches is not None:
        data = prepare_batches(d.token_batches, t.num_steps, t.global_batch_size, t.seq_length, cfg.model.vocab_size)
    else:
        data = prepare(d.hf_dataset, d.hf_dataset_config, d.hf_dataset_split, d.hf_text_template, d.tokenizer_path,
                       t.seq_length, t.seed, d.shuffle, cfg.model.vocab_size)
    initial = None
    if cfg.checkpoint.init_from is not None:
        init_cfg, initial = load_init(cfg.checkpoint.init_from)
        if init_cfg.model_dump(exclude={"name"}) != cfg.model.model_dump(exclude={"name"}):
            raise EngineError(f"--init-from {cfg.checkpoint.init_from}: its config.json describes another model than "
                              f"--model {cfg.model.name}")
    loaded = _checkpoint_to_resume(cfg, data)
    start = loaded.step if loaded is not None else 0
    if start >= t.num_steps:  # e.g. a requeued job that had finished: nothing to do
        if ctx.is_main:
            print(f"checkpoint {loaded.path} is at step {start} >= --num-steps {t.num_steps}: nothing to train")
        return {"steps": start, "first_step": start + 1, "losses": []}

    model = build_model(cfg.model, ops, ctx.device, dtype, cfg.runtime.recompute)
    if cfg.runtime.resolved_compile():
        compile_loss(model)
    master_dtype = torch.float32
    fresh = None if loaded is not None else initial if initial is not None else init_weights(model, t.init_std, t.seed)
    optimizer = AdamW(dict(model.named_parameters()), loaded.master if loaded else fresh, adamw_op=ops.adamw,
                      betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, master_dtype=master_dtype)
    log = StepLog(cfg.runtime.log_file, ctx.is_main, t.num_steps, start)
    try:
        if loaded is not None:
            _restore(loaded, optimizer, ctx, log)
        schedule = Schedule(o.lr_schedule, o.lr, o.min_lr, o.warmup_steps, t.num_steps, o.decay_steps)
        trainer = Trainer(model, optimizer, schedule, ctx, micro_batch_size=t.micro_batch_size, grad_clip=o.grad_clip,
                          master_dtype=master_dtype, bucket_mb=t.bucket_mb, zero1=o.zero1)
        rows = t.global_batch_size // ctx.world
        if cfg.runtime.cuda_graph:  # asked for: refused before any step or checkpoint
            cuda_graph.check(trainer, rows)
        graphed = cfg.runtime.cuda_graph or (cfg.runtime.cuda_graph is None and cuda_graph.supported(trainer, rows))
        loader = data.loader(t.global_batch_size, ctx.rank, ctx.world)
        log.print(f"model {cfg.model.name} ({cfg.model.num_params() / 1e6:.1f} M params) on {ctx.world} x {ctx.device.type} "
                  f"{str(dtype).removeprefix('torch.')}; data: {data.describe()}; "
                  f"global batch {t.global_batch_size} x {t.seq_length} = micro {t.micro_batch_size} x accum {accum} x DP {ctx.world}; "
                  f"ops {ops.names}; compile {cfg.runtime.resolved_compile()}, CUDA graph {graphed}, "
                  f"deterministic {cfg.runtime.resolved_deterministic()}")
        return _loop(cfg, ctx, trainer, loader, data, log, start, graphed)
    finally:
        log.close()


class _Staged:
    """A step's (loss, grad norm, valid tokens), copied to the host behind the step's own work: on CUDA an
    asynchronous copy into pinned memory and an event recorded after it, so `read` waits for this step
    only; elsewhere the tensors themselves (reading them is synchronous there anyway)."""

    def __init__(self, res: StepResult):
        self.res, self.host, self.event = res, None, None
        if res.loss.is_cuda:
            values = torch.stack([res.loss.double(), res.grad_norm.double(), res.valid_tokens.double()])
            self.host = torch.empty(3, dtype=torch.float64, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> tuple[float, float, int]:
        if self.event is None:
            return float(self.res.loss), float(self.res.grad_norm), int(self.res.valid_tokens)
        self.event.synchronize()
        loss, norm, valid = self.host.tolist()
        return loss, norm, int(valid)


class _StepReports:
    """Reads a step's scalars one step late and logs them: the loop queues step N+1 before it reads step
    N, so on a GPU the host never waits for an idle device.

    On a GPU, `hold` queues a copy of step N's scalars into pinned host memory and records an event right
    after step N, before step N+1 is queued; `flush` waits for that event alone. (Reading the device
    tensors instead, `.item()`, would wait for everything queued on the stream, step N+1 included: each
    step's time would then be observed one step late, and the last one as ~0 ms.)

    step_time_s is the wall time between consecutive step completions (the first: from the start of the
    loop, or from the end of a checkpoint save). A GPU step's completion is observed when its event is
    reached. A CPU step runs inside train_step, so it completes when train_step returns; its late read
    would count the next step's compute too."""

    def __init__(self, cfg: EngineConfig, ctx: DistContext, log: StepLog):
        self.cfg, self.ctx, self.log = cfg, ctx, log
        self.tokens = cfg.train.global_batch_size * cfg.train.seq_length
        self.sync_device = ctx.device.type == "cpu"  # train_step returns when the step is done
        self.pending: tuple[int, _Staged, float] | None = None  # step, its result staged, when train_step returned
        self.times: list[float] = []
        self.losses: list[float] = []
        self.mark = time.perf_counter()  # the last completion (or the loop's start)

    def hold(self, step: int, res: StepResult) -> None:
        """Call right after queueing `step`: stages its scalars, reports the step before it, keeps this one."""
        returned = time.perf_counter()
        staged = _Staged(res)
        self.flush()
        self.pending = (step, staged, returned)

    def flush(self) -> None:
        """Read and log the held step (before a checkpoint, a stop, the end, an error)."""
        if self.pending is None:
            return
        (step, staged, returned), self.pending = self.pending, None
        loss, norm, valid = staged.read()  # waits for this step (and what was queued before it) only
        res = staged.res
        done = returned if self.sync_device else time.perf_counter()
        dt, self.mark = done - self.mark, done
        cfg, t, tokens = self.cfg, self.cfg.train, self.tokens
        self.log.step({"step": step + 1, "loss": loss, "grad_norm": norm, "lr": res.lr, "tokens": tokens,
                       "valid_tokens": valid, "step_time_s": dt, "tokens_per_s": tokens / dt,
                       "mfu": mfu(cfg.model, t.seq_length, tokens, dt, self.ctx.world),
                       "tflops_per_gpu": cfg.model.flops_per_token(t.seq_length) * tokens / dt / self.ctx.world / 1e12})
        self.times.append(dt)
        self.losses.append(loss)

    def restart_clock(self) -> None:
        """After a checkpoint save: the save's time is no step's."""
        self.mark = time.perf_counter()


def _loop(cfg: EngineConfig, ctx: DistContext, trainer: Trainer, loader, data: Data, log: StepLog, start: int,
          graphed: bool) -> dict:
    t, c = cfg.train, cfg.checkpoint
    stop = t.num_steps if t.exit_after_steps is None else min(t.num_steps, start + t.exit_after_steps)
    reports = _StepReports(cfg, ctx, log)
    train_step = cuda_graph.GraphedStep(trainer) if graphed else trainer.train_step
    with Prefetcher(loader.batch, start, stop, ctx.device) as batches:  # builds (and pins) the next steps' batches
        try:
            for step in range(start, stop):
                ids, labels = (x.to(ctx.device, non_blocking=True) for x in batches.get(step))
                reports.hold(step, train_step(ids, labels))  # queue this step, then read the last one
                if c.save_dir is not None and (step + 1 == stop or (c.save_interval and (step + 1) % c.save_interval == 0)):
                    reports.flush()  # the log reaches the checkpoint's step before the checkpoint exists
                    _save(cfg, ctx, step + 1, trainer.optimizer, loader, data, log)
                    reports.restart_clock()
        except Exception:
            with contextlib.suppress(Exception):  # log the last good step, as the synchronous loop had
                reports.flush()
            raise
        reports.flush()
    if t.exit_after_steps is not None and stop == start + t.exit_after_steps:
        log.print(f"stopping after {t.exit_after_steps} steps (--exit-after-steps); continue with --resume")
    return _summary(cfg, ctx, trainer, start, reports.times, reports.losses)


def _summary(cfg: EngineConfig, ctx: DistContext, trainer: Trainer, start: int, times: list[float], losses: list[float]) -> dict:
    t = cfg.train
    tokens = t.global_batch_size * t.seq_length
    timed = times[1:] or times  # the first step pays one-time costs
    median = statistics.median(timed)
    return {"steps": start + len(losses), "first_step": start + 1, "losses": losses, "step_time_s": median,
            "tokens_per_s": tokens / median, "mfu": mfu(cfg.model, t.seq_length, tokens, median, ctx.world),
            "peak_mem_gib": runtime.peak_memory_gib(ctx.device), "world_size": ctx.world,
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."), "torch": torch.__version__}
