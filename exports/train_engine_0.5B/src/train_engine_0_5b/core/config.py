"""The model-independent sections of an engine's typed configuration (train, optim, data, checkpoint,
runtime), each field documented and validated with a message that names it. The engine's root config
(its config.py: `EngineConfig`) nests them beside the model; `pretrain`'s options are derived from these
fields (cli_options.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EngineError

Recompute = Literal["none", "mlp", "attention", "layer"]  # what each transformer layer recomputes in backward
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class _Section(BaseModel):
    # strict: `num_steps = true` in a TOML is an error, not 1 (an int still fills a float field)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(Protocol):
    """What the core reads of an engine's model config (MFU, logs, data checks)."""

    name: str
    vocab_size: int

    def flops_per_token(self, seq_length: int) -> float: ...

    def num_params(self) -> int: ...


class RunConfig(Protocol):
    """What the core reads of an engine's root config: the model beside these sections."""

    model: ModelConfig
    train: "TrainConfig"
    optim: "OptimConfig"
    data: "DataConfig"
    checkpoint: "CheckpointConfig"
    runtime: "RuntimeConfig"

    def model_dump(self, **kwargs: Any) -> dict: ...


class DataConfig(_Section):
    hf_dataset: str | None = Field(None, description="local file/dir (Parquet, Arrow, JSON/JSONL, text) or Hub name; default: the shipped corpus")
    hf_dataset_config: str | None = Field(None, description="Hub dataset configuration")
    hf_dataset_split: str = Field("train", description="split of a Hub / save_to_disk dataset")
    hf_text_template: str | None = Field(None, description='e.g. "Question: {question}\\nAnswer: {answer}"; default: the text column')
    tokenizer_path: str | None = Field(None, description="HF tokenizer directory; default: --init-from's tokenizer if it "
                                       "has one, else the shipped tokenizer")
    shuffle: bool = Field(True, description="shuffle documents each epoch (seeded)")
    token_batches: Path | None = Field(None, strict=False, description="train on these pre-batched token ids (safetensors "
                                       "input_ids/labels, steps x global batch x seq) instead of a dataset")
    prepared_data: list[str] | None = Field(None, strict=False, description="train on this prepared dataset (a prepare-data "
                                            "--out directory, read by memmap); repeat it to mix several, with --data-weights")
    data_weights: list[float] | None = Field(None, strict=False, description="one weight per --prepared-data, summing to 1 "
                                             "(refused otherwise, never normalized)")
    eval_split: float = Field(0.0, ge=0, lt=1, description="fraction of each --prepared-data set's samples held out for "
                              "validation (chosen by the data's content, the same for every seed)")
    eval_data: str | None = Field(None, description="a prepared dataset to validate on (all of it), instead of --eval-split")
    eval_interval: int = Field(0, ge=0, description="validate every N steps and at the end (0: never)")
    eval_iters: int = Field(10, gt=0, description="batches of --global-batch-size rows per validation")


class TrainConfig(_Section):
    num_steps: int = Field(100, gt=0, description="optimizer steps of the whole run")
    global_batch_size: int = Field(8, gt=0, description="sequences per step over all ranks")
    micro_batch_size: int = Field(4, gt=0, description="sequences per forward/backward per rank")
    seq_length: int = Field(4096, gt=1, description="tokens per sequence")
    seed: int = Field(0, description="weights init, document order, torch's generators")
    init_std: float = Field(0.1, gt=0, description="embedding init std; hidden matrices use init_std / sqrt(hidden / dim_model_base)")
    bucket_mb: float = Field(25.0, gt=0, description="gradient all-reduce bucket (MiB of fp32)")
    exit_after_steps: int | None = Field(None, gt=0, description="stop (with a checkpoint) after N steps of this run, "
                                         "e.g. to fit a time-limited allocation; continue with --resume")
    nan_policy: Literal["stop", "skip"] = Field("stop", description="a step with a non-finite loss or grad norm: stop the "
                                                "run before any checkpoint of it, or skip it (no update of weights or moments)")
    max_skipped_steps: int = Field(10, ge=0, description="--nan-policy skip: the run stops at skipped step N + 1")


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-4, ge=0, description="learning rate at the end of the decay")
    warmup_steps: int = Field(100, ge=1, description="linear warmup from lr / warmup_steps to lr")
    lr_schedule: Literal["wsd", "cosine", "constant"] = Field("wsd", description="wsd (warmup-stable-decay) | cosine | constant")
    decay_steps: int | None = Field(None, ge=1, description="wsd decay length (default 10 % of the steps)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only, never norm weights)")
    grad_clip: float = Field(1.0, ge=0, description="global-norm clip (0: off)")
    betas: tuple[float, float] = Field((0.9, 0.95), strict=False, description="AdamW betas (config file only)")
    eps: float = Field(1e-8, gt=0, description="AdamW eps (config file only)")
    zero1: bool = Field(False, description="shard optimizer state over data-parallel ranks (ZeRO-1: reduce-scatter "
                        "gradients, all-gather parameters); checkpoints stay whole")


class CheckpointConfig(_Section):
    save_dir: Path | None = Field(None, strict=False, description="checkpoint directory: step_XXXXXXXX/ folders, `latest` "
                                  "naming the newest, config.toml (the resolved run config)")
    save_interval: int = Field(0, ge=0, description="save every N steps (0: at the end only)")
    resume: bool = Field(False, description="continue from --save-dir's latest checkpoint")
    init_from: Path | None = Field(None, strict=False, description="start from a Hugging Face MiniCPM checkpoint directory "
                                   "in the official layout (config.json + safetensors, sharded or not, or "
                                   "pytorch_model.bin); the model config and the tokenizer come from it")


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    deterministic: bool | None = Field(None, description="deterministic kernels (bit-identical resume on one GPU); "
                                       "default: on for a CPU, off on CUDA")
    compile: bool | None = Field(None, description="torch.compile the forward + loss; default: on with CUDA")
    cuda_graph: bool | None = Field(None, description="replay the whole step as one CUDA graph (CUDA, no tensor "
                                    "parallelism); default: on for one rank where it applies, more ranks when asked")
    recompute: Recompute = Field("none", description="activation recomputation per layer: none | mlp | attention | layer "
                                 "(memory for compute)")
    tp: int = Field(1, ge=1, description="tensor-parallel degree (the ranks of one model replica; the data-parallel "
                    "degree is the world size / tp); an engine without tensor parallelism takes 1 only")
    async_tp: bool = Field(False, description="overlap the TP collectives with the GEMMs (Inductor's micro-pipeline "
                           "TP over symmetric memory; needs CUDA, --tp > 1 and --compile)")
    log_file: Path | None = Field(None, strict=False, description="JSONL step log, appended (rank 0)")
    tensorboard_dir: Path | None = Field(None, strict=False, description="also log each step to TensorBoard here "
                                         "(needs the tensorboard package)")
    wandb_project: str | None = Field(None, description="also log each step to this Weights & Biases project "
                                      "(needs the wandb package)")

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


def build_section(cls: type[BaseModel], **values):
    """One config model (a section, or an engine's root config) from values; validation errors become one
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
