"""`bench`: time training steps of this engine on random tokens: warm-up steps, then the median of
the timed ones (each step synchronized). Under torchrun every rank trains; tokens are global.

With `op_table`, after the timed steps (which it leaves alone): torch.profiler over 2 more steps, then,
the model freed, each op timed alone at the run's shapes (op_table.py); the result gets "op_table"."""

from __future__ import annotations

import platform
import statistics
import sys
import time

import torch

from train_engine_0_5b import config, op_table as op_table_mod
from train_engine_0_5b.build import build_trainer
from train_engine_0_5b.core import runtime
from train_engine_0_5b.core.cuda_graph import step_function
from train_engine_0_5b.core.dist import DistContext
from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.core.metrics import mfu
from train_engine_0_5b.model_config import MiniCPMConfig
from train_engine_0_5b.ops.registry import OpSelection, resolve


# A constant LR, so every timed step does the same work; everything else is pretrain's default optimizer.
BENCH_OPTIM = dict(lr_schedule="constant", lr=1e-4, min_lr=1e-4, warmup_steps=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(is_main: bool, total: int, every_s: float = 2.0):
    """A stderr line now and then (stdout stays the JSON): a slow step (a 0.5B step on a CPU takes minutes) is
    visible as it ends; fast steps print only the last one."""
    last = [time.perf_counter()]

    def say(text: str, step: int | None = None) -> None:
        now = time.perf_counter()
        if is_main and (step is None or step == total - 1 or now - last[0] >= every_s):
            print(f"bench: {text}", file=sys.stderr, flush=True)
            last[0] = now

    return say


def run(model_cfg: MiniCPMConfig, *, seq_length: int, micro_batch_size: int, grad_accum: int, steps: int, warmup: int,
        device: str, dtype: torch.dtype, ops_selection: OpSelection, deterministic: bool, compile: bool = False,
        seed: int = 0, op_table: bool = False, recompute: str = "none", zero1: bool = False,
        cuda_graph: bool | None = False) -> tuple[dict, bool]:
    """(the result JSON, whether this process is rank 0). `cuda_graph`: the step is captured at the last
    warm-up step (cuda_graph.py), so every timed step is a replay; None: wherever cuda_graph.check allows."""
    if cuda_graph and warmup < 2:
        raise EngineError(f"--cuda-graph needs --warmup >= 2 (eager steps, then the capture; got {warmup})")
    cuda_graph = False if warmup < 2 else cuda_graph  # the default graphs only where an eager step precedes the capture
    runtime.setup(device, deterministic)
    ctx = DistContext.start(device)
    try:
        ops = resolve(ops_selection, ctx.device.type, dtype)
        rows = micro_batch_size * grad_accum
        cfg = config.build(model=model_cfg, ops=ops_selection,
                           train=dict(num_steps=warmup + steps, global_batch_size=rows * ctx.world,
                                      micro_batch_size=micro_batch_size, seq_length=seq_length, seed=seed),
                           optim=BENCH_OPTIM | dict(zero1=zero1),
                           runtime=dict(device=ctx.device.type, deterministic=deterministic, compile=compile,
                                        cuda_graph=cuda_graph, recompute=recompute))
        trainer = build_trainer(cfg, ctx, ops, dtype=dtype)
        model, optimizer = trainer.model, trainer.optimizer
        # captured at the last warm-up step, so every timed step is a replay
        train_step, cuda_graph = step_function(trainer, cfg, rows, eager_steps=warmup - 1)
        gen = torch.Generator(device=ctx.device).manual_seed(seed + ctx.rank)
        times = []

        def batch() -> torch.Tensor:
            return torch.randint(0, model_cfg.vocab_size, (rows, seq_length + 1), generator=gen, device=ctx.device)

        def step(tokens: torch.Tensor) -> None:
            res = train_step(tokens[:, :-1], tokens[:, 1:])
            float(res.loss)  # waits for the step
            _sync(ctx.device)

        say = _progress(ctx.is_main, warmup + steps)
        say(f"{model_cfg.name} on {ctx.device.type}: {warmup} warm-up + {steps} timed steps of {rows} x {seq_length} "
            f"tokens per rank" + ("; on a CPU each step of this model takes minutes (--model tiny: seconds)"
                                  if ctx.device.type == "cpu" and model_cfg.hidden_size >= 1024 else ""))
        for i in range(warmup + steps):
            tokens = batch()
            _sync(ctx.device)
            t0 = time.perf_counter()
            step(tokens)
            took = time.perf_counter() - t0
            if i >= warmup:
                times.append(took)
            say(f"step {i + 1}/{warmup + steps} ({'warm-up' if i < warmup else 'timed'}): {took:.3g} s", step=i)
        step_time = statistics.median(times)
        global_tokens = rows * seq_length * ctx.world
        peak = max(ctx.all_gather_object(runtime.peak_memory_gib(ctx.device)))
        device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else (platform.processor() or "cpu")
        result = {
            "tokens_per_s": global_tokens / step_time, "step_time_s": step_time,
            "mfu": mfu(model_cfg, seq_length, global_tokens, step_time, ctx.world, ctx.device.type), "peak_mem_gib": peak,
            "device": device_name, "torch": torch.__version__, "world_size": ctx.world, "step_times_s": times,
            "config": {"model": model_cfg.name, "seq_length": seq_length, "micro_batch_size": micro_batch_size,
                       "grad_accum": grad_accum, "global_batch_size": rows * ctx.world, "dtype": str(dtype).removeprefix("torch."),
                       "steps": steps, "warmup": warmup, "deterministic": deterministic, "compile": compile,
                       "recompute": recompute, "zero1": zero1, "cuda_graph": cuda_graph, "ops": ops.names,
                       "tuned": ops.record()["tuned"], "tuned_key": ops.record()["tuned_key"]},
        }
        if op_table:
            batches = iter([batch() for _ in range(2)])
            profile = op_table_mod.profile_steps(lambda: step(next(batches)), ctx.device, steps=2)
            param_shapes = [tuple(p.shape) for p in model.parameters()]
            del trainer, optimizer, model, step, train_step  # the per-op inputs need the memory (0.5B: GB-sized logits)
            op_table_mod.free_memory(ctx.device)
            shapes = dict(micro_batch_size=micro_batch_size, seq_length=seq_length, grad_accum=grad_accum, dtype=dtype,
                          param_shapes=param_shapes)
            op_rows = op_table_mod.microbench(model_cfg, ops, device=ctx.device, **shapes)
            result["op_table"] = op_table_mod.table(model_cfg, op_rows, profile, **shapes)
        return result, ctx.is_main
    finally:
        ctx.close()
