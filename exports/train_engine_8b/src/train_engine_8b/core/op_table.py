"""`bench --op-table`, shared by every engine: where a training step's time goes, per op and per kernel category.

Two views, both at the bench run's shapes (tokens = micro_batch_size x seq_length):

- `microbench`: every registry op the model calls in a step (the engine's `StepOps`: which op, which
  implementation, how many calls per optimizer step), timed alone (forward + backward; AdamW: one step) on
  fresh random inputs, for the implementation the run selected and for the op's `reference`, then
  multiplied by its calls per step. Eager, even when the bench
  compiles the loss path (torch.compile fuses across ops; the profile below shows that effect).
  Median of `reps` after `warmup` calls (core/timer.py): CUDA events on a GPU, wall clock on a CPU. An op that fails
  (e.g. out of memory: the reference attention materializes the (B, n, S, S) scores) gets its error
  string in the row instead of numbers.
- `profile_steps`: torch.profiler over real training steps; device kernel time (on a CPU: each op's
  self CPU time) grouped by `classify(kernel name)` into `CATEGORIES`, per step and as a share of the
  profiled step's wall time, plus the top kernels by total time.

JSON (`bench`'s "op_table" key; ms are milliseconds):
    ops: [{op, impl, calls_per_step, ms_per_call, ms_per_step, reference_ms_per_step, speedup,
           error, reference_error}]        speedup = reference_ms_per_step / ms_per_step; null where unknown
    total_ms_per_step, reference_total_ms_per_step   sums over the rows (null if a row has no number)
    shapes: {tokens, batch, seq_length, hidden, ffn, heads, kv_heads, head_dim, vocab, layers, grad_accum,
             dtype, parameters}
    profile: {activity, steps, step_time_ms, kernel_ms_per_step, categories: {name: {ms_per_step, share}},
              top_kernels: [{name, category, count, ms, ms_per_step}]}   count and ms: over all profiled steps
"""

from __future__ import annotations

import gc
import math
import re
import time
import warnings
from collections import defaultdict
from typing import Callable

import torch

from dataclasses import dataclass

from ..minicpm.config import MiniCPMConfig
from ..ops.cases import Dims, build
from ..ops.registry import OPS
from .timer import time_calls

CATEGORIES: tuple[str, ...] = ("gemm", "attention", "triton", "optimizer", "communication", "other")
TOP_KERNELS = 30
NAME_CHARS = 120
# First match wins (lower-cased substrings). Optimizer before triton (our `_adamw_kernel` is Triton);
# triton before attention/gemm: a generated kernel's prefix is certain, keywords are guesses.
# `multi_tensor_apply` is torch's foreach machinery, which this engine uses only around the optimizer step.
_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl",)),
    ("optimizer", ("adam", "multi_tensor_apply")),
    ("triton", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn")),
    ("gemm", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "splitkreduce", "aten::mm", "aten::addmm", "aten::bmm")),
)
_OWN_TRITON = re.compile(r"_\w+_kernel")  # this engine's @triton.jit kernels: _rmsnorm_fwd_kernel, _rope_kernel, ...


def classify(name: str) -> str:
    """The category of a kernel (or, on a CPU, an aten op) by its name; "other" when nothing matches."""
    low = name.lower()
    for category, keys in _KEYWORDS:
        if any(k in low for k in keys) or (category == "triton" and _OWN_TRITON.fullmatch(name)):
            return category
    return "other"


@dataclass(frozen=True)
class StepOp:
    """One registry op as a training step calls it: its label ("attention", "gemm.qkv", ...), the implementation
    that runs and its callable, and its calls per optimizer step."""

    op: str
    impl: str
    fn: Callable
    calls: int


# An engine's ops of one step, in the order its model calls them: (the Trainer, micro batches per step) -> StepOp list.
StepOps = Callable[[object, int], list[StepOp]]


# ---- per-op microbenchmark ---------------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached GPU blocks back, so the next op starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _case(op: str, fn: Callable, cfg: MiniCPMConfig, batch: int, seq: int, dtype: torch.dtype, device: torch.device,
          param_shapes: list[tuple[int, ...]]) -> Callable[[], None]:  # fmt: skip
    """A no-argument call running `fn` (an implementation of `op`) once at the run's shapes (ops/cases.py)."""
    dims = Dims.of_model(cfg, batch, seq, tuple(tuple(s) for s in param_shapes))
    return build(op, dims, dtype, device, seed=0).timed(fn)


def _time_op(op: str, fn: Callable, args: tuple, warmup: int, reps: int) -> tuple[float | None, str | None]:
    """(median ms per call, None), or (None, the error) when building the inputs or running fails;
    `args`: _case's after `fn`."""
    device = args[4]
    try:
        return time_calls(_case(op, fn, *args), device=device, reps=reps, warmup=warmup).median_ms, None
    except Exception as e:  # out of memory, an unsupported shape, ...: a row, not a crash
        return None, f"{type(e).__name__}: {e}"[:500]
    finally:
        free_memory(device)


def microbench(cfg: MiniCPMConfig, step_ops: list[StepOp], *, micro_batch_size: int, seq_length: int,
               dtype: torch.dtype, device: torch.device, param_shapes: list[tuple[int, ...]], warmup: int = 2,
               reps: int = 5) -> list[dict]:  # fmt: skip
    """One row per op of `step_ops` (see the module doc): the implementation that runs and `reference`."""
    args = (cfg, micro_batch_size, seq_length, dtype, device, param_shapes)
    rows = []
    for s in step_ops:
        ms, error = _time_op(s.op, s.fn, args, warmup, reps)
        if s.impl == "reference":
            ref_ms, ref_error = ms, error
        else:
            ref_ms, ref_error = _time_op(s.op, OPS[s.op.split(".")[0]]["reference"], args, warmup, reps)
        per_step = None if ms is None else ms * s.calls
        ref_per_step = None if ref_ms is None else ref_ms * s.calls
        rows.append({
            "op": s.op, "impl": s.impl, "calls_per_step": s.calls, "ms_per_call": ms, "ms_per_step": per_step,
            "reference_ms_per_step": ref_per_step,
            "speedup": ref_per_step / per_step if per_step and ref_per_step is not None else None,
            "error": error, "reference_error": ref_error,
        })  # fmt: skip
    return rows


def _total(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows]
    return None if any(v is None for v in values) else sum(values)


def table(cfg: MiniCPMConfig, rows: list[dict], profile: dict, *, micro_batch_size: int, seq_length: int,
          grad_accum: int, dtype: torch.dtype, param_shapes: list[tuple[int, ...]]) -> dict:  # fmt: skip
    """The "op_table" JSON value (module doc)."""
    shapes = {"tokens": micro_batch_size * seq_length, "batch": micro_batch_size, "seq_length": seq_length,
              "hidden": cfg.hidden_size, "ffn": cfg.ffn_hidden_size, "heads": cfg.num_heads,
              "kv_heads": cfg.num_kv_heads, "head_dim": cfg.dim_head, "vocab": cfg.vocab_size,
              "layers": cfg.num_layers, "grad_accum": grad_accum, "dtype": str(dtype).removeprefix("torch."),
              "parameters": sum(math.prod(s) for s in param_shapes)}  # fmt: skip
    return {"ops": rows, "total_ms_per_step": _total(rows, "ms_per_step"),
            "reference_total_ms_per_step": _total(rows, "reference_ms_per_step"), "shapes": shapes, "profile": profile}


# ---- profiler breakdown of real steps ----------------------------------------------------------------


def breakdown(kernels: list[tuple[str, float]], steps: int, step_time_ms: float, activity: str) -> dict:
    """The "profile" JSON value from (kernel name, microseconds) pairs over `steps` profiled steps."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, us in kernels:
        by_name[name][0] += 1
        by_name[name][1] += us / 1e3
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, (_, ms) in by_name.items():
        per_category[classify(name)] += ms / steps
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    return {
        "activity": activity, "steps": steps, "step_time_ms": step_time_ms,
        "kernel_ms_per_step": sum(per_category.values()),
        "categories": {c: {"ms_per_step": ms, "share": ms / step_time_ms if step_time_ms > 0 else None}
                       for c, ms in per_category.items()},
        "top_kernels": [{"name": name[:NAME_CHARS], "category": classify(name), "count": count, "ms": ms,
                         "ms_per_step": ms / steps} for name, (count, ms) in top],
    }  # fmt: skip


def profile_steps(step: Callable[[], None], device: torch.device, steps: int = 2) -> dict:
    """Profile `steps` calls of `step` (a training step that synchronizes before returning). On CUDA
    the kernels' device time; on a CPU each op's self CPU time (exclusive, so nested ops count once)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with warnings.catch_warnings():  # torch 2.11 on CUDA warns that events are cleared per cycle; one cycle here
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            wall_ms = (time.perf_counter() - t0) * 1e3
    if on_gpu:
        kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        kernels = [(e.name, e.self_cpu_time_total) for e in prof.events()
                   if e.device_type == DeviceType.CPU and not e.is_async]  # fmt: skip
    return breakdown(kernels, steps, wall_ms / steps, "cuda" if on_gpu else "cpu")


# ---- rendering -------------------------------------------------------------------------------------


def render(op_table: dict):
    """rich tables of an "op_table" value: the ops, the categories, the top kernels."""
    from rich.table import Table

    def num(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    rows = op_table["ops"]
    errors = any(r["error"] or r["reference_error"] for r in rows)
    ops = Table(title=f"ops alone, eager, {op_table['shapes']['tokens']} tokens per micro batch")
    for col in ("op", "impl", "calls", "ms/call", "ms/step", "ref ms/step", "speedup") + (("error",) if errors else ()):
        ops.add_column(col, justify="left" if col in ("op", "impl", "error") else "right", no_wrap=col != "error")
    for r in rows:
        err = "; ".join(f"{who}: {e[:80]}" for who, e in (("impl", r["error"]), ("ref", r["reference_error"])) if e)
        ops.add_row(r["op"], r["impl"], str(r["calls_per_step"]), num(r["ms_per_call"]), num(r["ms_per_step"]),
                    num(r["reference_ms_per_step"]), num(r["speedup"], ".2f"), *((err,) if errors else ()))
    totals = (num(op_table["total_ms_per_step"]), num(op_table["reference_total_ms_per_step"]))
    ops.add_row("total", "", "", "", *totals, "", *(("",) if errors else ()))
    prof = op_table["profile"]
    cats = Table(title=f"profile ({prof['activity']}): {prof['step_time_ms']:.1f} ms/step")
    for col in ("category", "ms/step", "share"):
        cats.add_column(col, justify="left" if col == "category" else "right")
    for name, c in prof["categories"].items():
        cats.add_row(name, num(c["ms_per_step"]), "-" if c["share"] is None else f"{100 * c['share']:.1f} %")
    top = Table(title=f"top kernels, {prof['steps']} steps")
    for col in ("kernel", "category", "count", "ms"):
        top.add_column(col, justify="left" if col in ("kernel", "category") else "right", overflow="fold")
    for k in prof["top_kernels"]:
        top.add_row(k["name"], k["category"], str(k["count"]), num(k["ms"]))
    return ops, cats, top


# ---- the bench's Extra -----------------------------------------------------------------------------


class OpTable:
    """core/bench.py's Extra for `--op-table`: after the timed steps (which it leaves alone), torch.profiler over
    2 more steps, then, the model freed, each op of `step_ops` timed alone at the run's shapes; the result gets
    "op_table" and the tables go to stderr."""

    def __init__(self, step_ops: StepOps):
        self.step_ops = step_ops

    def profile(self, trainer, step: Callable[[torch.Tensor], None], batch: Callable[[], torch.Tensor]) -> dict:
        model = trainer.model
        device = next(model.parameters()).device
        drawn = [batch() for _ in range(2)]
        step_ops = self.step_ops(trainer, drawn[0].shape[0] // trainer.micro_batch_size)  # callables, not the model
        batches = iter(drawn)
        profile = profile_steps(lambda: step(next(batches)), device, steps=2)
        return dict(profile=profile, device=device, model_cfg=model.cfg, step_ops=step_ops,
                    dtype=next(model.parameters()).dtype, param_shapes=[tuple(p.shape) for p in model.parameters()])

    def finish(self, profiled: dict, result: dict) -> None:
        from rich.console import Console

        from .cli_guard import err

        c = result["config"]
        free_memory(profiled["device"])
        shapes = dict(micro_batch_size=c["micro_batch_size"], seq_length=c["seq_length"], dtype=profiled["dtype"],
                      param_shapes=profiled["param_shapes"])
        rows = microbench(profiled["model_cfg"], profiled["step_ops"], device=profiled["device"], **shapes)
        result["op_table"] = table(profiled["model_cfg"], rows, profiled["profile"], grad_accum=c["grad_accum"], **shapes)
        # stderr: stdout stays one JSON document; 120 columns unless a terminal says otherwise
        out = err if err.is_terminal else Console(stderr=True, highlight=False, width=120)
        for t in render(result["op_table"]):
            out.print(t)
