"""`pretrain`: build everything from an EngineConfig, train, log, checkpoint, resume; one loop for every engine,
which hands in its model part (`EngineParts`: how to build its Trainer, its step function, its run-config writer).

Order matters for bad input: options, data, tokenizer, the save dir and the checkpoint to resume are all
checked before the first byte is written, so a run that fails on its input leaves no checkpoint behind.
Non-finite steps (--nan-policy): `stop` raises when the step is read (step_reports.py), which is before any
checkpoint that would include it; `skip` lets the trainer check each step before its update.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data import Data, Prefetcher, attach_eval, open_prepared, prepare, prepare_batches
from ..minicpm.init_from import open_init, tokenizer_dir
from . import checkpoint as ckpt
from . import ckpt_dir, runtime, sinks
from .dist import DistContext
from .engine_config import EngineConfig
from .errors import EngineError
from .evaluate import evaluate
from .metrics import StepLog, mfu
from .optim import AdamW
from .step_reports import StepReports
from .trainer import StepResult, Trainer
from .weights import Initial

TrainStep = Callable[[torch.Tensor, torch.Tensor], StepResult]


@dataclass(frozen=True)
class EngineParts:
    """What `pretrain` needs of an engine's model part."""

    # (cfg, world context, initial master weights by HF name or None, compute dtype) -> the Trainer, whose `dp`
    # is the data-parallel group (the loader's ranks) and whose model's parameters may be TP-sharded; the
    # weights: whole tensors (a checkpoint's) or --init-from's lazy reader (weights.local_masters reads them)
    build_trainer: Callable[[EngineConfig, DistContext, Initial | None, torch.dtype], Trainer]
    # (trainer, cfg, rows per rank per step) -> (the step the loop calls, whether it is a CUDA graph)
    step_function: Callable[[Trainer, EngineConfig, int], tuple[TrainStep, bool]]
    # the op implementations a run uses, recorded in the log and each checkpoint
    ops_record: Callable[[Trainer], dict]
    # SAVE_DIR/config.toml (a --config file of the run), or None where the engine has no run-config file
    write_config: Callable[[EngineConfig, Path], Path] | None = None

# Settings a resumed run must share with its checkpoint (anything else, e.g. num_steps, may change).
RESUME_KEYS = ("model", "seq_length", "global_batch_size", "data_fingerprint", "tokenizer_fingerprint")


def _identity(cfg: EngineConfig, data: Data) -> dict:
    return {"model": json.loads(cfg.model.model_dump_json()), "seq_length": cfg.train.seq_length,
            "global_batch_size": cfg.train.global_batch_size, "data_fingerprint": data.fingerprint,
            "tokenizer_fingerprint": data.tokenizer.fingerprint if data.tokenizer is not None else None}


def _checkpoint_to_resume(cfg: EngineConfig, data: Data, ctx: DistContext) -> ckpt.Checkpoint | None:
    save_dir = cfg.checkpoint.save_dir
    if save_dir is None:
        return None
    ckpt_dir.check_writable(save_dir)
    if ctx.is_main:
        for note in ckpt_dir.clean(save_dir):
            print(note)
    ctx.barrier()  # no rank reads `latest` while rank 0 may still finish a killed save's pointer
    latest = ckpt.find_latest(save_dir)
    if latest is None:
        return None
    if not cfg.checkpoint.resume:
        raise EngineError(f"--save-dir {save_dir} already holds checkpoints (latest: {latest.name}); "
                          "pass --resume to continue from it, or choose another --save-dir")
    loaded = ckpt.open_to_resume(latest, ctx)
    saved = {k: loaded.state.get("identity", {}).get(k) for k in RESUME_KEYS}
    diff = ckpt.mismatches(saved, _identity(cfg, data))
    if diff:
        raise EngineError(f"checkpoint {latest} was written by a different configuration; it cannot be resumed "
                          "with these options:\n  " + "\n  ".join(diff[:12]))
    return loaded


def _save(cfg: EngineConfig, ctx: DistContext, step: int, optimizer: AdamW, loader, data: Data, log: StepLog,
          skipped: int, ops: dict) -> None:
    rng, py_rng = runtime.gather_rng(ctx)
    state = {"identity": _identity(cfg, data), "config": json.loads(cfg.model_dump_json()),
             "data": loader.cursor(step), "schedule": {"next_step": step + 1, "kind": cfg.optim.lr_schedule},
             "optimizer_steps": optimizer.step_count, "skipped_steps": skipped,
             "world_size": ctx.world, "tp": cfg.runtime.tp, "zero1": optimizer.units is not None,
             "python_rng": py_rng, "torch": torch.__version__, "ops": ops}
    try:  # a collective: every rank writes its own optimizer shards
        path = ckpt.save(cfg.checkpoint.save_dir, step, optimizer, ctx, rng, state, data.tokenizer)
    except ckpt.SaveFailed as e:  # a full disk, a permission: one line, nothing lost
        raise EngineError(_save_failure(cfg.checkpoint.save_dir, step, str(e))) from None
    log.print(f"saved checkpoint {path}")


def _save_failure(save_dir, step: int, reason: str) -> str:
    try:
        kept = f"the last good checkpoint ({ckpt.find_latest(save_dir).name}) and `latest` are untouched"
    except (EngineError, AttributeError, OSError):
        kept = "no earlier checkpoint was touched"
    return f"cannot write checkpoint {ckpt.step_dir_name(step)} in {save_dir}: {reason}; {kept}"


def _restore(loaded: ckpt.Checkpoint, trainer: Trainer, ctx: DistContext, log: StepLog, tp: int) -> None:
    ckpt.restore(loaded, trainer)  # on this run's ranks, ZeRO-1 and TP layout, whatever wrote it
    saved = (loaded.state.get("world_size"), loaded.state.get("tp", 1))
    if saved == (ctx.world, tp):
        runtime.restore_rank_rng(loaded.rng, loaded.state["python_rng"], ctx)
    else:
        log.print(f"note: checkpoint written with {saved[0]} ranks at TP={saved[1]}, resuming on {ctx.world} at "
                  f"TP={tp}: same data order, but not bit-identical (reduction order and RNG streams differ)")
    log.print(f"resumed from {loaded.path} at step {loaded.step}")


def run(cfg: EngineConfig, engine: EngineParts) -> dict:
    """Train per `cfg` with `engine`'s model part; returns a summary (rank 0's view). Raises EngineError on bad
    input."""
    device, dtype = cfg.runtime.resolved_device(), cfg.runtime.resolved_dtype()
    runtime.setup(device, cfg.runtime.resolved_deterministic())
    ctx = DistContext.start(device)
    try:
        summary = _train(cfg, ctx, dtype, engine)
        ctx.barrier()  # no rank tears its group down while another still works (rank 0 ends the save alone)
        return summary
    finally:
        ctx.close()


def _train(cfg: EngineConfig, ctx: DistContext, dtype: torch.dtype, engine: EngineParts) -> dict:
    t, o = cfg.train, cfg.optim
    torch.manual_seed(t.seed)  # every generator starts from --seed (a resume then restores the saved ones)
    random.seed(t.seed)
    if ctx.is_main and o.warmup_steps >= t.num_steps:
        print(f"warning: --warmup-steps {o.warmup_steps} >= --num-steps {t.num_steps}: the learning rate never "
              f"reaches --lr {o.lr:g}", file=sys.stderr)
    if ctx.world % cfg.runtime.tp:
        raise EngineError(f"--tp {cfg.runtime.tp} does not divide the world size ({ctx.world} ranks)")
    accum = cfg.grad_accum(ctx.world // cfg.runtime.tp)  # each TP group of ranks trains the same rows
    sinks.check(cfg)
    d, init_dir = cfg.data, cfg.checkpoint.init_from
    tokenizer_path = d.tokenizer_path or (tokenizer_dir(init_dir) if init_dir is not None else None)
    if d.prepared_data:
        data = open_prepared(d.prepared_data, d.data_weights, d.eval_data, d.eval_split, tokenizer_path, t.seq_length,
                             t.seed, d.shuffle, cfg.model.vocab_size)
    elif d.token_batches is not None:
        data = prepare_batches(d.token_batches, t.num_steps, t.global_batch_size, t.seq_length, cfg.model.vocab_size,
                               tokenizer_path)
    else:
        data = prepare(d.hf_dataset, d.hf_dataset_config, d.hf_dataset_split, d.hf_text_template, tokenizer_path,
                       t.seq_length, t.seed, d.shuffle, cfg.model.vocab_size)
    if d.eval_data is not None and not d.prepared_data:
        data = attach_eval(data, d.eval_data, t.seq_length, cfg.model.vocab_size)
    initial = None
    if init_dir is not None:
        init_cfg, initial = open_init(init_dir)  # lazy: each rank reads its shards in build_trainer
        diff = init_cfg.differences(cfg.model)
        if diff:
            raise EngineError(f"--init-from {init_dir}: its config.json describes another model than --model "
                              f"{cfg.model.name} (config.json vs --model):\n  " + "\n  ".join(diff))
    loaded = _checkpoint_to_resume(cfg, data, ctx)
    start = loaded.step if loaded is not None else 0
    if start >= t.num_steps:  # e.g. a requeued job that had finished: nothing to do
        if ctx.is_main:
            print(f"checkpoint {loaded.path} is at step {start} >= --num-steps {t.num_steps}: nothing to train")
        return {"steps": start, "first_step": start + 1, "losses": []}

    # a format-3 or -4 checkpoint's masters are read into the built (maybe sharded) trainer by _restore
    trainer = engine.build_trainer(
        cfg, ctx, loaded.master if loaded is not None and loaded.master is not None else initial, dtype)
    dp = trainer.dp
    log = StepLog(sinks.open_sinks(cfg) if ctx.is_main else [], ctx.is_main, t.num_steps, start)
    try:
        if loaded is not None:
            _restore(loaded, trainer, ctx, log, cfg.runtime.tp)
        rows = t.global_batch_size // dp.world
        train_step, graphed = engine.step_function(trainer, cfg, rows)  # asked for and refused: before any step or checkpoint
        loader = data.loader(t.global_batch_size, dp.rank, dp.world)
        tp = f" x TP {cfg.runtime.tp}" if cfg.runtime.tp > 1 else ""
        log.print(f"model {cfg.model.name} ({cfg.model.num_params() / 1e6:.1f} M params) on {ctx.world} x {ctx.device.type} "
                  f"{str(dtype).removeprefix('torch.')}; data: {data.describe()}; "
                  f"global batch {t.global_batch_size} x {t.seq_length} = micro {t.micro_batch_size} x accum {accum} "
                  f"x DP {dp.world}{tp}; "
                  f"ops {engine.ops_record(trainer)}; compile {cfg.runtime.resolved_compile()}, CUDA graph {graphed}, "
                  f"deterministic {cfg.runtime.resolved_deterministic()}")
        skipped = int(loaded.state.get("skipped_steps", 0)) if loaded is not None else 0
        if ctx.is_main and cfg.checkpoint.save_dir is not None and engine.write_config is not None:
            engine.write_config(cfg, cfg.checkpoint.save_dir)  # every check passed: the save dir is written
        return _loop(cfg, ctx, trainer, train_step, loader, data, log, start, skipped, engine.ops_record(trainer))
    finally:
        log.close()


def _loop(cfg: EngineConfig, ctx: DistContext, trainer: Trainer, train_step: TrainStep, loader, data: Data, log: StepLog,
          start: int, skipped: int, ops: dict) -> dict:
    t, c = cfg.train, cfg.checkpoint
    stop = t.num_steps if t.exit_after_steps is None else min(t.num_steps, start + t.exit_after_steps)
    reports = StepReports(cfg, ctx, log)
    dp = trainer.dp  # validation rows and sums are the data-parallel group's, as training's
    eval_loader = data.eval_loader(t.global_batch_size, dp.rank, dp.world) if cfg.data.eval_interval else None
    with Prefetcher(loader.batch, start, stop, ctx.device) as batches:  # builds (and pins) the next steps' batches
        try:
            for step in range(start, stop):
                ids, labels = (x.to(ctx.device, non_blocking=True) for x in batches.get(step))
                res = train_step(ids, labels)
                reports.hold(step, res)  # queue this step, then read the last one
                if eval_loader is not None and ((step + 1) % cfg.data.eval_interval == 0 or step + 1 == t.num_steps):
                    ev = evaluate(trainer.model, dp, eval_loader, cfg.data.eval_iters, t.micro_batch_size)
                    reports.flush(extra=ev)  # the step's log record carries its eval_loss and eval_ppl
                    log.print(f"[EVAL {step + 1}] eval_loss={ev['eval_loss']:.4f} | eval_ppl={ev['eval_ppl']:.2f} | "
                              f"{ev['eval_tokens']:,} tokens")
                    reports.restart_clock()  # the validation's time is no step's
                skipped += res.skipped
                if res.skipped and skipped > t.max_skipped_steps:
                    raise EngineError(f"step {step + 1}: non-finite loss or grad norm, skipped step number {skipped} "
                                      f"(--max-skipped-steps {t.max_skipped_steps}); the run stops without saving it")
                if c.save_dir is not None and (step + 1 == stop or (c.save_interval and (step + 1) % c.save_interval == 0)):
                    reports.flush()  # the log reaches the checkpoint's step (and a non-finite step stops) before it exists
                    _save(cfg, ctx, step + 1, trainer.optimizer, loader, data, log, skipped, ops)
                    reports.restart_clock()
        except Exception:
            with contextlib.suppress(Exception):  # log the last good step, as the synchronous loop had
                reports.flush()
            raise
        reports.flush()
    if t.exit_after_steps is not None and stop == start + t.exit_after_steps:
        log.print(f"stopping after {t.exit_after_steps} steps (--exit-after-steps); continue with --resume")
    if skipped:
        log.print(f"note: {skipped} step(s) skipped for a non-finite loss or grad norm so far (--nan-policy skip)")
    return _summary(cfg, ctx, trainer, start, reports.times, reports.losses)


def _summary(cfg: EngineConfig, ctx: DistContext, trainer: Trainer, start: int, times: list[float], losses: list[float]) -> dict:
    t = cfg.train
    tokens = t.global_batch_size * t.seq_length
    timed = times[1:] or times  # the first step pays one-time costs
    median = statistics.median(timed)
    return {"steps": start + len(losses), "first_step": start + 1, "losses": losses, "step_time_s": median,
            "tokens_per_s": tokens / median, "mfu": mfu(cfg.model, t.seq_length, tokens, median, ctx.world, ctx.device.type),
            "peak_mem_gib": runtime.peak_memory_gib(ctx.device), "world_size": ctx.world,
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."), "torch": torch.__version__}
