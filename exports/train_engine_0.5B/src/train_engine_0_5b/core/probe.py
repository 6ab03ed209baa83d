"""The probe contract (the workspace's gates/probe.py and gates/case.py describe it), answered by an engine's own
model, reducer, optimizer and checkpoints: the case and the probes shared by every engine, which hands in its
model part (`ProbeParts`: how to build its Trainer, its forward with the residual stream, its stack name).

    probe forward|backward|steps|checkpoint --case DIR --out DIR   ->  DIR/tensors.safetensors, DIR/metrics.json

A case holds case.json, weights.safetensors (HF MiniCPM names) and batches.safetensors
(steps, world_size, rows_per_rank, seq). Under torchrun with N processes (N dividing the case's
world_size) rank r takes ranks [r*k, (r+1)*k) of every step, k = world_size / N, so one process
answers a DP=2 case as DP=1 on the same global batch. With tensor parallelism (`--tp T`) each data-parallel rank
is T processes: N / T of them share the case's ranks, and every answer is the whole tensor (TP shards gathered).
Rank 0 writes; after `steps` each data-parallel rank d also writes DIR/ranks/rank{d}.safetensors: `loss_sums` and
`valid_tokens` (steps,) of its own rows. Anything an engine cannot do (an unknown probe or case field, a CUDA case
without a GPU) raises Unsupported: exit 77.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from ..data.tokenizer import TextTokenizer
from ..minicpm.config import MiniCPMConfig, hf_param_shapes
from ..ops.cases import Dims
from ..ops.registry import OpSelection, resolve
from . import checkpoint as ckpt
from . import runtime
from .config import DTYPES
from .dist import DistContext
from .engine_config import EngineConfig, build
from .errors import EngineError, Unsupported
from .tensor_parallel import whole
from .trainer import IGNORE_INDEX, Trainer

PROBES = ("forward", "backward", "steps", "checkpoint")
CASE_FORMAT = 1
RANKS_DIR = "ranks"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerSpec(_Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)


class ScheduleSpec(_Strict):
    kind: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = Field(1, ge=1)
    decay_steps: int | None = Field(None, ge=1)


class CaseSpec(_Strict):
    """case.json, as this engine reads it (strict: a field it does not know is unsupported)."""

    format: int = CASE_FORMAT
    model: MiniCPMConfig
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    world_size: int = Field(1, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_length: int = Field(16, ge=2)
    steps: int = Field(4, ge=1)
    seed: int = 0
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()


class Case:
    def __init__(self, directory: Path):
        try:
            self.spec = CaseSpec.model_validate_json((directory / "case.json").read_text())
        except FileNotFoundError:
            raise EngineError(f"case {directory}: missing case.json") from None
        except ValidationError as e:
            # A field or value this engine does not know is "unsupported"; a malformed case is an error.
            kind = Unsupported if all(err["type"] in ("extra_forbidden", "literal_error") for err in e.errors()) else EngineError
            raise kind(f"case {directory}: case.json: {e}") from None
        if self.spec.format != CASE_FORMAT:
            raise Unsupported(f"case {directory}: format {self.spec.format}, this engine reads format {CASE_FORMAT}")
        for f in ("weights.safetensors", "batches.safetensors"):
            if not (directory / f).is_file():
                raise EngineError(f"case {directory}: missing {f}")
        self.weights = load_file(str(directory / "weights.safetensors"))
        expected = hf_param_shapes(self.spec.model)
        if {k: tuple(v.shape) for k, v in self.weights.items()} != expected:
            raise EngineError(f"case {directory}: weights.safetensors does not match the model's HF parameter names and shapes")
        self.batches = load_file(str(directory / "batches.safetensors"))
        s = self.spec
        want = (s.steps, s.world_size, s.micro_batch_size * s.grad_accum, s.seq_length)
        if any(tuple(self.batches[k].shape) != want for k in ("input_ids", "labels")):
            raise EngineError(f"case {directory}: batches must have shape {want}")

    def engine_config(self, tp: int = 1) -> EngineConfig:
        """The case's run as an engine config (eager: no compile, no CUDA graph), at tensor-parallel degree `tp`."""
        s = self.spec
        return build(
            model=s.model,
            train=dict(num_steps=s.steps, global_batch_size=s.world_size * s.micro_batch_size * s.grad_accum,
                       micro_batch_size=s.micro_batch_size, seq_length=s.seq_length, seed=s.seed),
            optim=dict(lr=s.optimizer.lr, min_lr=s.optimizer.min_lr, betas=s.optimizer.betas, eps=s.optimizer.eps,
                       weight_decay=s.optimizer.weight_decay, grad_clip=s.optimizer.grad_clip, lr_schedule=s.schedule.kind,
                       warmup_steps=s.schedule.warmup_steps, decay_steps=s.schedule.decay_steps),
            runtime=dict(device=s.device, compile=False, cuda_graph=False, tp=tp))

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.spec.dtype]

    @property
    def master_dtype(self) -> torch.dtype:
        return torch.float64 if self.spec.dtype == "float64" else torch.float32

    def local_batch(self, step: int, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of step `step` for data-parallel rank ctx.rank of ctx.world: case ranks [r*k, (r+1)*k),
        flattened in rank order."""
        k = self.spec.world_size // ctx.world
        sl = slice(ctx.rank * k, (ctx.rank + 1) * k)
        return tuple(self.batches[n][step, sl].flatten(0, 1).to(ctx.device) for n in ("input_ids", "labels"))


@dataclass(frozen=True)
class ProbeParts:
    """What the probes need of an engine's model part."""

    stack: str  # the name metrics.json gives
    # (cfg, world context, resolved ops, whole master weights by HF name, compute dtype, master dtype) -> Trainer
    build_trainer: Callable[[EngineConfig, DistContext, Any, dict, torch.dtype, torch.dtype], Trainer]
    # (case, world context, resolved ops, tp) -> {"logits", "loss", "hidden_states.{i}"} of step 0's whole batch
    # (the residual stream after the embedding and after each layer), whole tensors on rank 0
    forward: Callable[["Case", DistContext, Any, int], dict[str, torch.Tensor]]
    # (--ops, tp) -> the selection the engine runs (its own `auto` choices, the ops it leaves unfused at this TP)
    selection: Callable[[OpSelection, int], OpSelection] = lambda ops, tp: ops
    # tp -> the registry ops the model calls, the only ones metrics.json names (None: every op of the table)
    registry_ops: Callable[[int], tuple[str, ...]] | None = None


def forward_answer(dp: DistContext, logits: torch.Tensor, loss_sum: torch.Tensor, labels: torch.Tensor,
                   hidden: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward probe's answer from each data-parallel rank's local rows: the loss summed over the ranks and
    divided by all their valid labels, logits and residual streams gathered in rank order (a model part's `forward`
    ends here)."""
    count = dp.all_reduce_sum_((labels != IGNORE_INDEX).sum())
    total = dp.all_reduce_sum_(loss_sum.clone())
    out = {"logits": torch.cat(dp.all_gather(logits)), "loss": total / count}
    return out | {f"hidden_states.{i}": torch.cat(dp.all_gather(h)) for i, h in enumerate(hidden)}


class _Run:
    """Model, optimizer and trainer built from the case's weights (or a checkpoint)."""

    def __init__(self, case: Case, ctx: DistContext, ops, parts: ProbeParts, tp: int):
        self.case, self.ctx = case, ctx
        master = {k: v.to(case.master_dtype) for k, v in case.weights.items()}
        self.trainer = parts.build_trainer(case.engine_config(tp), ctx, ops, master, case.compute_dtype,
                                           case.master_dtype)
        self.dp = self.trainer.dp  # whose rows this process trains
        self.model, self.optimizer = self.trainer.model, self.trainer.optimizer
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.rank_sums: list[torch.Tensor] = []  # this process's own rows: CE sum and valid labels per step
        self.rank_counts: list[torch.Tensor] = []

    def train_until(self, steps: int) -> None:
        while self.trainer.step < steps:
            res = self.trainer.train_step(*self.case.local_batch(self.trainer.step, self.dp))
            self.losses.append(res.loss)
            self.norms.append(res.grad_norm)
            self.lrs.append(res.lr)
            self.rank_sums.append(self.trainer.rank_loss_sum)
            self.rank_counts.append(self.trainer.rank_valid_tokens)

    def rank_outputs(self) -> dict[str, torch.Tensor]:
        """The contract's per-rank outputs (`ranks/rank{r}.safetensors`)."""
        return {"loss_sums": torch.stack(self.rank_sums).double(), "valid_tokens": torch.stack(self.rank_counts).long()}

    def outputs(self, losses: list, norms: list, lrs: list[float]) -> dict[str, torch.Tensor]:
        out = {"losses": torch.stack(losses), "grad_norms": torch.stack(norms), "lrs": torch.tensor(lrs, dtype=torch.float64)}
        return out | {f"weight.{k}": v for k, v in self.optimizer.master_weights().items()}


def _backward(case: Case, ctx: DistContext, ops, parts: ProbeParts, tp: int) -> dict[str, torch.Tensor]:
    run = _Run(case, ctx, ops, parts, tp)
    loss, _ = run.trainer.compute_grads(*case.local_batch(0, run.dp))
    params = run.trainer.params  # a TP shard's gradient is gathered whole (a collective)
    return {"loss": loss} | {f"grad.{k}": whole(g, params[k]).to(case.master_dtype) for k, g in run.trainer.grads.items()}


def _steps(case: Case, ctx: DistContext, ops, out: Path, parts: ProbeParts, tp: int) -> dict[str, torch.Tensor]:
    run = _Run(case, ctx, ops, parts, tp)
    run.train_until(case.spec.steps)
    rank_outputs = run.rank_outputs()
    if ctx.rank % tp == 0:  # one file per data-parallel rank (its TP ranks hold the same rows)
        (out / RANKS_DIR).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in rank_outputs.items()},
                  str(out / RANKS_DIR / f"rank{run.dp.rank}.safetensors"))
    return run.outputs(run.losses, run.norms, run.lrs)


def _checkpoint(case: Case, ctx: DistContext, ops, out: Path, parts: ProbeParts, tp: int) -> dict[str, torch.Tensor]:
    """Half the steps, a real engine checkpoint under out/ckpt, a fresh run resumed from it, the rest."""
    s = case.spec
    half = s.steps // 2
    first = _Run(case, ctx, ops, parts, tp)
    first.train_until(half)
    rng, py_rng = runtime.gather_rng(ctx)
    # The model config and (when it fits the vocabulary) the shipped tokenizer go along, so that
    # `export-hf --checkpoint OUT/ckpt` works on this checkpoint as on a pretrain one (gate M6).
    tokenizer = TextTokenizer() if ctx.is_main else None
    state = {"world_size": ctx.world, "tp": tp, "data": {"next_step": half}, "python_rng": py_rng,
             "config": {"model": json.loads(s.model.model_dump_json())}}
    ckpt.save(out / "ckpt", half, first.optimizer, ctx, rng, state,
              tokenizer if tokenizer is not None and tokenizer.vocab_size <= s.model.vocab_size else None)
    history = (first.losses, first.norms, first.lrs)
    del first
    loaded = ckpt.open_to_resume(out / "ckpt", ctx)
    second = _Run(case, ctx, ops, parts, tp)
    ckpt.restore(loaded, second.trainer)
    runtime.restore_rank_rng(loaded.rng, loaded.state["python_rng"], ctx)
    second.train_until(case.spec.steps)
    return second.outputs(history[0] + second.losses, history[1] + second.norms, history[2] + second.lrs)


def run_probe(name: str, case_dir: Path, out: Path, parts: ProbeParts, ops_selection: OpSelection = OpSelection(),
              tp: int = 1) -> Path:
    """Answer one probe with `parts`' model at tensor-parallel degree `tp`; returns the output directory. Raises
    Unsupported (exit 77) or EngineError."""
    if name not in PROBES:
        raise Unsupported(f"unknown probe {name!r}; this engine answers {', '.join(PROBES)}")
    case = Case(case_dir)
    s = case.spec
    if s.device == "cuda" and not torch.cuda.is_available():
        raise Unsupported("the case runs on cuda, and this machine has no CUDA device")
    runtime.setup(s.device, deterministic=True, reference_numerics=True)
    ctx = DistContext.start(s.device)
    try:
        if ctx.world % tp or s.world_size % (ctx.world // tp):
            raise Unsupported(f"the case has world_size {s.world_size}, which {ctx.world} processes at TP={tp} cannot split")
        ops = resolve(parts.selection(ops_selection, tp), s.device, case.compute_dtype,
                      dims=Dims.of_model(s.model, s.micro_batch_size, s.seq_length))
        ran = {label: impl for label, impl in ops.names.items()
               if parts.registry_ops is None or label.partition(".")[0] in parts.registry_ops(tp)}
        t0 = time.perf_counter()
        if name == "forward":
            tensors = parts.forward(case, ctx, ops, tp)
        elif name == "backward":
            tensors = _backward(case, ctx, ops, parts, tp)
        elif name == "steps":
            tensors = _steps(case, ctx, ops, out, parts, tp)
        else:
            tensors = _checkpoint(case, ctx, ops, out, parts, tp)
        if s.device == "cuda":
            torch.cuda.synchronize()
        metrics = {"probe": name, "stack": parts.stack, "time_s": time.perf_counter() - t0, "device": s.device,
                   "dtype": s.dtype, "processes": ctx.world, "tp": tp, "ops": ran}
        if "loss" in tensors:
            metrics["loss"] = float(tensors["loss"])
        if "losses" in tensors:
            metrics["losses"] = [float(x) for x in tensors["losses"]]
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        ctx.barrier()
        return out
    finally:
        ctx.close()
