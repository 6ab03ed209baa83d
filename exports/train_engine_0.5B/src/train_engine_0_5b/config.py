"""The engine's typed configuration: one root (`EngineConfig`), sections nested under it, each field
documented and validated with a message that names it. The CLI builds one from its options; a
checkpoint records the one it was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train_engine_0_5b.errors import EngineError
from train_engine_0_5b.model import Recompute
from train_engine_0_5b.model_config import MiniCPMConfig
from train_engine_0_5b.ops.registry import OpSelection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    hf_dataset: str | None = Field(None, description="local file/dir (Parquet, Arrow, JSON/JSONL, text) or Hub name; None: shipped corpus")
    hf_dataset_config: str | None = Field(None, description="Hub dataset configuration name")
    hf_dataset_split: str = Field("train", description="split of a Hub or save_to_disk dataset")
    hf_text_template: str | None = Field(None, description="str.format template over record fields; None: the 'text' column")
    tokenizer_path: str | None = Field(None, description="HF tokenizer directory; None: the shipped default tokenizer")
    shuffle: bool = Field(True, description="shuffle documents each epoch (seeded)")
    token_batches: Path | None = Field(None, description="pre-batched token ids (data/batches.py) instead of a dataset: "
                                       "safetensors input_ids / labels of shape (steps, global batch, seq)")


class TrainConfig(_Section):
    num_steps: int = Field(gt=0, description="optimizer steps in the whole run")
    global_batch_size: int = Field(gt=0, description="rows (sequences) per step over all ranks")
    micro_batch_size: int = Field(gt=0, description="rows per forward/backward on one rank")
    seq_length: int = Field(gt=1, description="tokens per row")
    seed: int = Field(0, description="weights init and document order")
    init_std: float = Field(0.1, gt=0, description="embedding init std; hidden matrices use init_std / sqrt(hidden / dim_model_base)")
    bucket_mb: float = Field(25.0, gt=0, description="gradient all-reduce bucket size (MiB of fp32)")
    exit_after_steps: int | None = Field(None, gt=0, description="stop (saving a checkpoint) after this many steps of this "
                                         "invocation, e.g. to fit a time-limited allocation; continue with resume")


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=1)
    lr_schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    decay_steps: int | None = Field(None, ge=1, description="wsd only; default ceil(10 %) of num_steps")
    weight_decay: float = Field(0.1, ge=0, description="matrices only, never norm weights")
    grad_clip: float = Field(1.0, ge=0, description="global-norm clip; 0 disables it")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    zero1: bool = Field(False, description="shard fp32 masters and AdamW moments over the data-parallel ranks (ZeRO-1: "
                        "reduce-scatter gradients, all-gather parameters); checkpoints stay whole")


class CheckpointConfig(_Section):
    save_dir: Path | None = Field(None, description="checkpoints go to save_dir/step_XXXXXXXX, `latest` names the newest")
    save_interval: int = Field(0, ge=0, description="save every N steps (0: only at the end)")
    resume: bool = Field(False, description="continue from save_dir's latest checkpoint")
    init_from: Path | None = Field(None, description="a Hugging Face MiniCPM checkpoint directory to start from "
                                   "(init_from.py); the model config comes from it")


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="compute dtype; auto: bf16 on GPU, fp32 on CPU")
    deterministic: bool | None = Field(None, description="torch deterministic algorithms (bit-identical resume on the "
                                       "same GPU); None: on for a CPU, off on CUDA, where it costs speed")
    compile: bool | None = Field(None, description="torch.compile the forward + loss (model.compile_loss); None: on with "
                                 "CUDA, off on a CPU")
    cuda_graph: bool | None = Field(None, description="capture the whole step (forward, backward, clipped AdamW) as one "
                                    "CUDA graph after two eager steps (cuda_graph.py): CUDA, one rank, one micro batch per "
                                    "step; None: on where it applies")
    recompute: Recompute = Field(
        "none", description="activation recomputation per layer (model.RECOMPUTE): none | mlp | attention | layer")
    log_file: Path | None = Field(None, description="JSONL, one line per step (rank 0)")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_deterministic(self) -> bool:
        return self.resolved_device() == "cpu" if self.deterministic is None else self.deterministic

    def resolved_compile(self) -> bool:
        return self.resolved_device() == "cuda" if self.compile is None else self.compile

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device() == "cuda" else torch.float32
        return DTYPES[self.dtype]


class EngineConfig(_Section):
    model: MiniCPMConfig
    ops: OpSelection = OpSelection()
    train: TrainConfig
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        t = self.train
        if t.seq_length > self.model.max_seq_length:
            raise ValueError(f"train.seq_length ({t.seq_length}) exceeds the model's max_seq_length "
                             f"({self.model.max_seq_length}, model {self.model.name})")
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({t.global_batch_size}) is not a multiple of "
                             f"train.micro_batch_size ({t.micro_batch_size})")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) exceeds optim.lr ({self.optim.lr})")
        if self.checkpoint.resume and self.checkpoint.save_dir is None:
            raise ValueError("checkpoint.resume needs checkpoint.save_dir (--save-dir)")
        return self

    def grad_accum(self, world: int) -> int:
        """Micro batches per rank per step; raises EngineError when the global batch does not split."""
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * world):
            raise EngineError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                              f"{t.micro_batch_size} x data-parallel size {world} = {t.micro_batch_size * world}")
        return t.global_batch_size // (t.micro_batch_size * world)


def build(**sections) -> EngineConfig:
    """EngineConfig from section values; validation errors become one EngineError naming each field."""
    return build_section(EngineConfig, **sections)


def build_section(cls: type[BaseModel], **values):
    """One config model (a section, or the whole EngineConfig) from values; validation errors become one
    EngineError naming each field (`bench` builds its RuntimeConfig alone)."""
    try:
        return cls(**values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {field}: {msg}" if field else f"  {msg}")  # cross-field checks name their fields
        raise EngineError("invalid engine config:\n" + "\n".join(lines)) from None
