"""`bench`, shared by every engine: time training steps on random tokens through the step `pretrain` runs (the
engine's Trainer from its EngineParts, cuda_graph.step_function): warm-up steps, then the median of the timed
ones, each synchronized. Under torchrun every rank trains; each data-parallel rank draws its own rows (the TP
ranks of one replica the same ones) and tokens are global. A bench figure is the engine's own clock: the gates
time `pretrain` on theirs (M5), and only that figure counts.

An engine adds to the result through `Extra` (`--op-table`: op_table.OpTable over the engine's ops of a step):
`profile` runs while the model lives, `finish` after it is freed."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from typing import Callable, Protocol

import torch

from . import runtime
from .cuda_graph import step_function
from .dist import DistContext
from .engine_config import EngineConfig, build
from .errors import EngineError
from .metrics import mfu
from .pretrain import EngineParts

# A constant LR, so every timed step does the same work; everything else is pretrain's default optimizer.
BENCH_OPTIM = dict(lr_schedule="constant", lr=1e-4, min_lr=1e-4, warmup_steps=1)


class Extra(Protocol):
    """An engine's addition to the result: `profile` while the Trainer lives (`step` runs one synchronized step on
    a (rows, seq + 1) token batch, `batch` draws one), `finish` once it is freed, adding its keys to `result`."""

    def profile(self, trainer, step: Callable[[torch.Tensor], None], batch: Callable[[], torch.Tensor]) -> object: ...

    def finish(self, profiled: object, result: dict) -> None: ...


def graph_choice(cuda_graph: bool | None, warmup: int) -> bool | None:
    """runtime.cuda_graph for a bench of `warmup` untimed steps: the capture is the last of them, after at least one
    eager step, so every timed step is a replay; fewer warm-up steps: never graphed (refused when asked)."""
    if cuda_graph and warmup < 2:
        raise EngineError(f"--cuda-graph needs --warmup >= 2 (eager steps, then the capture; got {warmup})")
    return False if warmup < 2 else cuda_graph


def config(model, ops, *, seq_length: int, micro_batch_size: int, grad_accum: int, steps: int, warmup: int,
           data_parallel: int, seed: int = 0, zero1: bool = False, **runtime_values) -> EngineConfig:
    """The bench run as an EngineConfig: `steps` + `warmup` steps of `grad_accum` micro batches per data-parallel
    rank, BENCH_OPTIM, runtime.cuda_graph from `graph_choice`."""
    if steps < 1 or warmup < 0:
        raise EngineError(f"bench needs --steps >= 1 and --warmup >= 0 (got {steps} and {warmup})")
    runtime_values["cuda_graph"] = graph_choice(runtime_values.get("cuda_graph"), warmup)
    rows = micro_batch_size * grad_accum
    return build(model=model, ops=ops, optim=BENCH_OPTIM | dict(zero1=zero1), runtime=runtime_values,
                 train=dict(num_steps=warmup + steps, global_batch_size=rows * data_parallel,
                            micro_batch_size=micro_batch_size, seq_length=seq_length, seed=seed))


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


def run(cfg: EngineConfig, engine: EngineParts, *, warmup: int, extra: Extra | None = None) -> tuple[dict, bool]:
    """Bench `cfg` (from `config`) with `engine`'s Trainer: (the result JSON, whether this process is rank 0)."""
    device, dtype, tp = cfg.runtime.resolved_device(), cfg.runtime.resolved_dtype(), cfg.runtime.tp
    deterministic = cfg.runtime.resolved_deterministic()
    runtime.setup(device, deterministic)
    ctx = DistContext.start(device)
    try:
        if ctx.world % tp:
            raise EngineError(f"--tp {tp} does not divide the world size ({ctx.world} ranks)")
        t, m = cfg.train, cfg.model
        rows = cfg.grad_accum(ctx.world // tp) * t.micro_batch_size  # per data-parallel rank and step
        steps = t.num_steps - warmup
        trainer = engine.build_trainer(cfg, ctx, None, dtype)
        record = engine.ops_record(trainer)
        train_step, graphed = step_function(trainer, cfg, rows, eager_steps=warmup - 1)
        dp = trainer.dp
        gen = torch.Generator(device=ctx.device).manual_seed(t.seed + dp.rank)
        times: list[float] = []

        def batch() -> torch.Tensor:
            return torch.randint(0, m.vocab_size, (rows, t.seq_length + 1), generator=gen, device=ctx.device)

        def step(tokens: torch.Tensor) -> None:
            res = train_step(tokens[:, :-1], tokens[:, 1:])
            float(res.loss)  # waits for the step
            _sync(ctx.device)

        say = _progress(ctx.is_main, t.num_steps)
        say(f"{m.name} on {ctx.device.type}: {warmup} warm-up + {steps} timed steps of {rows} x {t.seq_length} "
            f"tokens per data-parallel rank" + ("; on a CPU each step of this model takes minutes"
                                                if ctx.device.type == "cpu" and m.hidden_size >= 1024 else ""))
        for i in range(t.num_steps):
            tokens = batch()
            _sync(ctx.device)
            t0 = time.perf_counter()
            step(tokens)
            took = time.perf_counter() - t0
            if i >= warmup:
                times.append(took)
            say(f"step {i + 1}/{t.num_steps} ({'warm-up' if i < warmup else 'timed'}): {took:.3g} s", step=i)
        step_time = statistics.median(times)
        global_tokens = rows * t.seq_length * dp.world
        peak = max(ctx.all_gather_object(runtime.peak_memory_gib(ctx.device)))
        name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else (platform.processor() or "cpu")
        result = {
            "tokens_per_s": global_tokens / step_time, "step_time_s": step_time,
            "mfu": mfu(m, t.seq_length, global_tokens, step_time, ctx.world, ctx.device.type), "peak_mem_gib": peak,
            "device": name, "torch": torch.__version__, "world_size": ctx.world, "step_times_s": times,
            "config": {"model": m.name, "seq_length": t.seq_length, "micro_batch_size": t.micro_batch_size,
                       "grad_accum": rows // t.micro_batch_size, "global_batch_size": t.global_batch_size,
                       "dtype": str(dtype).removeprefix("torch."), "steps": steps, "warmup": warmup,
                       "deterministic": deterministic, "compile": cfg.runtime.resolved_compile(),
                       "recompute": cfg.runtime.recompute, "zero1": cfg.optim.zero1, "tp": tp, "cuda_graph": graphed,
                       "ops": record["names"]} | {k: record[k] for k in ("tuned", "tuned_key") if k in record},
        }
        if extra is not None:
            profiled = extra.profile(trainer, step, batch)
            del trainer, train_step, step  # the per-op table's cases need the memory (the 0.5B's: GB-sized logits)
            extra.finish(profiled, result)
        return result, ctx.is_main
    finally:
        ctx.close()
