"""The case format of the probe contract (docs/DESIGN.md, "The probe contract").

A case directory holds:
- `case.json`: `CaseSpec` (model config, dtype, device, world size, batch layout, optimizer and
  schedule, steps, seed);
- `weights.safetensors`: initial weights under Hugging Face MiniCPM names, in float32 (float64 for
  fp64 cases); a stack casts them to its compute dtype itself;
- `batches.safetensors`: `input_ids` and `labels`, int64, shape (steps, world_size, rows_per_rank, seq).
  Step t's global batch is all ranks' rows; rank r of a DP=world_size run gets `[:, r]`, and within a
  rank its rows are split into `grad_accum` micro batches of `micro_batch_size` rows, in order.
  Labels are the next token (`-100` where ignored: the generator ignores a random number of tokens
  per rank so that a DP loss that averages per-rank means instead of the global token mean is wrong).

The training loss of a step is sum(token CE over the global batch) / count(labels != -100).

Gate runs on the `tiny` preset draw their case shape from the run's seed (`draw_shape`, the one place
that draw lives): layers, sequence length, vocabulary, tied or untied head, micro batches, DP world
size, LR schedule and an all-reduce bucket size. Other presets keep the shapes the gate options give
(`option_shape`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file

from gates.model_config import LongRope, MiniCPMConfig, preset, validation_lines

CASE_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CaseError(ValueError):
    """A case directory that is missing, malformed or inconsistent."""


class OptimizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = Field(1, ge=1)
    decay_steps: int | None = Field(None, ge=1, description="wsd only; default ceil(10 % of steps)")


class CaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
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

    @model_validator(mode="after")
    def _check(self) -> "CaseSpec":
        if self.seq_length > self.model.max_seq_length:
            raise ValueError(f"seq_length ({self.seq_length}) exceeds model.max_seq_length ({self.model.max_seq_length})")
        return self

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch_size * self.grad_accum

    @property
    def global_batch_rows(self) -> int:
        return self.rows_per_rank * self.world_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def master_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


class Case:
    """A loaded case: spec, initial weights (master dtype) and batches."""

    def __init__(self, directory: Path, spec: CaseSpec, weights: dict[str, torch.Tensor], batches: dict[str, torch.Tensor]):
        self.dir, self.spec, self.weights, self.batches = directory, spec, weights, batches

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of step `step` (0-based), all ranks' rows concatenated: (rows, seq)."""
        return self.batches["input_ids"][step].flatten(0, 1), self.batches["labels"][step].flatten(0, 1)


def hf_param_shapes(cfg: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """Every trainable parameter by its HF MiniCPM name, in the module order of the model."""
    h, d, n, g, f = cfg.hidden_size, cfg.dim_head, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (n * d, h),
            p + "self_attn.k_proj.weight": (g * d, h),
            p + "self_attn.v_proj.weight": (g * d, h),
            p + "self_attn.o_proj.weight": (h, n * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def random_weights(cfg: MiniCPMConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Fresh random weights: matrices ~ N(0, 0.02); norm weights 1 + N(0, 0.1) so a stack that ignores
    a norm's weight is caught. Drawn in float32 (3x faster than float64: an 8B-shaped case has 2.5 B of them)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_param_shapes(cfg).items():
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        out[name] = (x.mul_(0.1).add_(1.0) if len(shape) == 1 else x.mul_(0.02)).to(dtype)
    return out


def random_batches(spec: CaseSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (spec.steps, spec.world_size, spec.rows_per_rank, spec.seq_length + 1)
    tokens = torch.randint(0, spec.model.vocab_size, shape, generator=gen)
    input_ids, labels = tokens[..., :-1].contiguous(), tokens[..., 1:].clone()
    # Ignore a different number of tokens on each (step, rank): the global token mean then differs
    # from a mean of per-rank means, so a DP stack that averages wrongly fails M4.
    flat = labels.view(spec.steps * spec.world_size, -1)
    for row in flat:
        k = int(torch.randint(0, max(1, row.numel() // 4), (1,), generator=gen))
        row[torch.randperm(row.numel(), generator=gen)[:k]] = -100
    pad = spec.model.pad_token_id
    if pad is not None:  # the padding row must be looked up, or its missing gradient shows nothing
        rows = input_ids.view(-1, spec.seq_length)
        rows[torch.arange(rows.shape[0]), torch.randint(0, spec.seq_length, (rows.shape[0],), generator=gen)] = pad
    return {"input_ids": input_ids, "labels": labels}


def new_case(out: str | Path, spec: CaseSpec, weights: dict[str, torch.Tensor] | None = None,
             batches: dict[str, torch.Tensor] | None = None, weights_file: Path | None = None) -> Path:
    """Write a case directory. Weights default to `random_weights(spec.model, spec.seed)`, batches to
    `random_batches(spec, spec.seed)`; `weights_file`: another case's weights file, hard-linked (copied across
    file systems) instead of written again (an 8B-shaped case's weights are 10 GB)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if weights_file is not None:
        try:
            os.link(weights_file, out / "weights.safetensors")
        except OSError:
            shutil.copyfile(weights_file, out / "weights.safetensors")
    else:
        weights = weights if weights is not None else random_weights(spec.model, spec.seed, spec.master_dtype)
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "weights.safetensors")
    batches = batches if batches is not None else random_batches(spec, spec.seed)
    save_file({k: v.contiguous() for k, v in batches.items()}, out / "batches.safetensors")
    (out / "case.json").write_text(spec.model_dump_json(indent=2) + "\n")
    return out


def make_spec(model: str | MiniCPMConfig = "tiny", **fields) -> CaseSpec:
    """A CaseSpec from a preset name (or config) and field overrides; raises CaseError naming the field."""
    cfg = preset(model) if isinstance(model, str) else model
    try:
        return CaseSpec(model=cfg, **fields)
    except ValidationError as e:
        raise CaseError("\n".join(["invalid case:", *validation_lines(e, "(case)")])) from None


def load_case(directory: str | Path) -> Case:
    d = Path(directory)
    for f in ("case.json", "weights.safetensors", "batches.safetensors"):
        if not (d / f).is_file():
            raise CaseError(f"case {d}: missing {f}")
    try:
        spec = CaseSpec.model_validate_json((d / "case.json").read_text())
    except ValidationError as e:
        raise CaseError(f"case {d}: bad case.json: {e}") from None
    weights = load_file(str(d / "weights.safetensors"))
    expected = hf_param_shapes(spec.model)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise CaseError(f"case {d}: weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise CaseError(f"case {d}: {k} has shape {tuple(weights[k].shape)}, expected {shape}")
    batches = load_file(str(d / "batches.safetensors"))
    want = (spec.steps, spec.world_size, spec.rows_per_rank, spec.seq_length)
    for k in ("input_ids", "labels"):
        if k not in batches or tuple(batches[k].shape) != want:
            raise CaseError(f"case {d}: batches[{k!r}] must have shape {want}")
    return Case(d, spec, weights, batches)


_DIGESTS: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime): a linked weights file is read once


def file_digest(path: Path) -> str:
    """sha256 of one file, streamed, remembered for this process by the file's identity and mtime."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def case_hash(directory: str | Path) -> str:
    """sha256 over the three case files' own sha256 digests, recorded in every gate report."""
    h = hashlib.sha256()
    for f in ("case.json", "weights.safetensors", "batches.safetensors"):
        h.update(f"{f} {file_digest(Path(directory) / f)}\n".encode())
    return h.hexdigest()


def describe(spec: CaseSpec) -> dict:
    return json.loads(spec.model_dump_json())


# ----- case shapes of gate runs ---------------------------------------------------------------------
DRAWN_PRESETS = ("tiny",)  # presets whose gate cases take their shape from the seed
DRAW_LAYERS = (3, 4)  # >= 3: red-team flaws sit in layers 0 and 1, with a clean layer after them
DRAW_SEQ = (65, 160)  # above 64, never a power of two (kernels' tail handling)
DRAW_VOCAB = (4096, 4600)  # >= the default tokenizer's 4096 tokens (M5's corpus, M6's exported tokenizer)
DRAW_MICRO_BATCH = (1, 2)  # rows per micro batch
DRAW_GRAD_ACCUM = (2, 3)  # micro batches per step, where a gate allows several
DRAW_WORLD = (2, 4)  # M4's data-parallel size
DRAW_WARMUP = (1, 2)
DRAW_DECAY = (1, 2)  # wsd decay steps: <= steps - steps // 2 for every steps >= 4, so M6 can cut the schedule
DRAW_BUCKET_MB = (0.01, 0.05)  # MiB: the tiny model's gradients (~2 MiB) span dozens of all-reduce buckets
DRAW_ROPE_FACTORS = ((1.0, 1.5), (1.0, 8.0))  # LongRoPE short / long factor ranges (the released ones: ~1-1.2, ~1-50)
DEFAULT_BUCKET_MB = 25.0  # torch DDP's bucket_cap_mb, for cases whose shape is not drawn


class CaseShape(BaseModel):
    """The shape a gate run builds its preset cases in. None: the preset's value (model fields) or
    the gate's own default (grad_accum, schedule)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int
    drawn: bool
    num_layers: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    seq_length: int = Field(ge=2)
    micro_batch_size: int = Field(ge=1)
    grad_accum: int | None = Field(None, ge=1, description="micro batches per step where a gate allows several")
    world_size: int = Field(ge=1, description="M4's data-parallel size")
    schedule: ScheduleSpec | None = None
    decay_steps: int | None = Field(None, ge=1, description="WSD decay length, for gates that need a wsd schedule")
    bucket_mb: float = Field(gt=0, description="all-reduce bucket size (MiB) for gates that run `pretrain --bucket-mb`")
    rope_scaling: LongRope | None = Field(None, description="MiniCPM4's LongRoPE with drawn factors; None: plain RoPE")
    pad_token_id: int | None = Field(None, ge=0, description="the embedding's padding row (no gradient from the lookup)")

    def model_overrides(self) -> dict:
        """The MiniCPMConfig fields this shape sets."""
        keys = ("num_layers", "vocab_size", "tie_word_embeddings", "rope_scaling", "pad_token_id")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def model(self, name: str) -> MiniCPMConfig:
        """Preset `name` with this shape's model fields, validated."""
        return MiniCPMConfig.model_validate(preset(name).model_dump() | self.model_overrides())


def draw_shape(seed: int) -> CaseShape:
    """The `tiny` gate case shape of a run, a pure function of its seed (recorded in every report)."""
    rng = random.Random(seed)
    seqs = [s for s in range(DRAW_SEQ[0], DRAW_SEQ[1] + 1) if s & (s - 1)]
    kind = rng.choice(["wsd", "cosine", "constant"])
    warmup, decay = rng.randint(*DRAW_WARMUP), rng.randint(*DRAW_DECAY)
    shape = CaseShape(
        seed=seed, drawn=True, num_layers=rng.randint(*DRAW_LAYERS), vocab_size=rng.randint(*DRAW_VOCAB),
        tie_word_embeddings=rng.random() < 0.5, seq_length=rng.choice(seqs),
        micro_batch_size=rng.randint(*DRAW_MICRO_BATCH), grad_accum=rng.randint(*DRAW_GRAD_ACCUM),
        world_size=rng.randint(*DRAW_WORLD),
        schedule=ScheduleSpec(kind=kind, warmup_steps=warmup, decay_steps=decay if kind == "wsd" else None),
        decay_steps=decay,
        bucket_mb=round(rng.uniform(*DRAW_BUCKET_MB), 4))
    # drawn after the fields above, so a seed keeps the shape it had before these two existed
    pairs = preset("tiny").dim_head // 2
    rope = None
    if rng.random() < 0.5:  # LongRoPE; the original length on either side of the sequence: both factor lists
        short, long = ([round(rng.uniform(*r), 4) for _ in range(pairs)] for r in DRAW_ROPE_FACTORS)
        original = rng.randint(shape.seq_length // 2, 2 * shape.seq_length)
        rope = LongRope(short_factor=short, long_factor=long, original_max_position_embeddings=original)
    pad = rng.randrange(DRAW_VOCAB[0]) if rng.random() < 0.5 else None
    return shape.model_copy(update={"rope_scaling": rope, "pad_token_id": pad})


def option_shape(seed: int, seq_length: int, micro_batch_size: int, world_size: int | None) -> CaseShape:
    """The shape of presets that are not drawn: the options' values, everything else the gate's own."""
    return CaseShape(seed=seed, drawn=False, seq_length=seq_length, micro_batch_size=micro_batch_size,
                     world_size=world_size or 2, bucket_mb=DEFAULT_BUCKET_MB)
