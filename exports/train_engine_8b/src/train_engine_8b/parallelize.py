"""How the 8B model runs in parallel, applied in one documented order (torchtitan's llama3 parallelize order):

1. tensor parallelism over mesh["tp"] (`apply_tp`), with sequence parallelism in the norm regions. First,
   because every later step wraps, compiles or hooks the modules it shards.
   - q/k/v_proj and gate/up_proj column-parallel (a rank holds n / tp query, g / tp KV heads and f / tp of
     the SwiGLU width); o_proj and down_proj row-parallel, reduce-scattered onto the sequence;
   - the embedding vocab-parallel (row-wise), its output scattered onto the sequence; lm_head vocab-parallel
     (column-wise) with its logits left sharded on the vocabulary for the vocab-parallel cross-entropy
     (vocab_parallel_ce.py; `loss_parallel` under train_context is the reference it is tested against);
   - every RMSNorm sequence-parallel: the residual stream between the sublayers is (B, S / tp, h) per rank.
2. activation recomputation (`apply_recompute`): the named part of every layer keeps only its inputs.
3. torch.compile (`apply_compile`): each decoder layer, after recomputation so its graph holds the checkpoints
   (under TP, compile and recomputation together are refused: torch 2.13 gets their gradients wrong). With
   `async_tp` (runtime.async_tp; CUDA, TP > 1) Inductor's micro-pipeline TP pass splits each all-gather -> GEMM and
   GEMM -> reduce-scatter of the compiled layers into chunks over symmetric memory, so the collectives overlap
   the GEMMs (`apply_async_tp`, torchtitan's switch).
4. data parallelism over mesh["dp"]: the shared core's reducer (core/dist.py; build.py hands it the DP group)
   sums each rank's local gradient shards over the DP ranks in buckets during backward, or with ZeRO-1
   reduce-scatters them and splits the optimizer state of each TP shard over the DP group. `GradSync` below is
   the plain reference the tests compare with.

Build order for a real run: `build_model` on meta -> `parallelize_model` -> `to_empty` -> load or init weights
(state_dict_adapter.load_hf), so no rank ever holds the whole unsharded model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from train_engine_8b.model import RECOMPUTE, MiniCPM, Recompute
from train_engine_8b.model_config import MiniCPMConfig


class ParallelError(ValueError):
    """A parallel layout this model cannot run; the message names the degree and the field it must divide."""


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel x tensor-parallel degrees; dp * tp is the world size."""

    dp: int
    tp: int

    def check(self, cfg: MiniCPMConfig, world_size: int | None = None) -> None:
        """Raises ParallelError when the layout cannot run this model (check_tp) or does not fill the world."""
        if self.dp < 1 or self.tp < 1:
            raise ParallelError(f"dp ({self.dp}) and tp ({self.tp}) must be at least 1")
        if world_size is not None and self.dp * self.tp != world_size:
            raise ParallelError(f"dp ({self.dp}) x tp ({self.tp}) = {self.dp * self.tp} must equal the world size ({world_size})")
        check_tp(cfg, self.tp)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The ("dp", "tp") mesh; tp innermost, so a TP group is consecutive ranks (one NVLink island)."""
        return init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))


def check_tp(cfg: MiniCPMConfig, tp: int) -> None:
    """Each TP rank must hold whole KV heads (GQA's groups stay on one rank) and equal vocab and FFN slices."""
    if tp == 1:
        return
    for field, size in (("num_kv_heads", cfg.num_kv_heads), ("vocab_size", cfg.vocab_size),
                        ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if size % tp:
            raise ParallelError(f"tensor parallel degree {tp} does not divide {field} ({size}); "
                                f"choose a degree that divides it" + (
                                    f" (for {cfg.num_kv_heads} KV heads: "
                                    f"{', '.join(str(d) for d in range(1, size + 1) if size % d == 0)})"
                                    if field == "num_kv_heads" else ""))
    if cfg.tie_word_embeddings:
        raise ParallelError("tensor parallelism needs an untied lm_head (tie_word_embeddings = false)")


def parallelize_model(model: MiniCPM, mesh: DeviceMesh | None, recompute: Recompute = "none",
                      compile: bool = False, async_tp: bool = False) -> MiniCPM:
    """Steps 1-3 on `model` in place (call on a meta-device model); returns it. `mesh` None: no tensor
    parallelism (one process, or data parallel only). Step 4 is the core's reducer (build.py)."""
    tp = mesh["tp"].size() if mesh is not None else 1
    check_tp(model.cfg, tp)
    if tp > 1 and compile and recompute != "none":
        # torch 2.13, CPU: a compiled layer that checkpoints DTensors fails in AOT autograd, and compiled
        # sublayers inside the checkpoint give wrong gradients from a warm AOTAutograd cache (README.md)
        raise ParallelError(f"compile with recompute={recompute!r} under tensor parallelism is not supported "
                            "(torch 2.13 computes wrong gradients); choose one of the two")
    if tp > 1:
        apply_tp(model, mesh["tp"])
    apply_recompute(model, recompute)
    if async_tp:
        if tp == 1 or not compile:
            raise ParallelError("async TP needs tensor parallelism and compile (runtime.async_tp)")
        apply_async_tp(mesh["tp"])
    if compile:
        apply_compile(model)
    return model


def apply_async_tp(tp_mesh: DeviceMesh) -> None:
    """3. (with compile) Let Inductor overlap the TP group's collectives with the GEMMs it compiles."""
    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def apply_tp(model: MiniCPM, tp_mesh: DeviceMesh) -> None:
    """1. Shard the parameters over `tp_mesh` (the plan in the module docstring)."""
    model.register_forward_pre_hook(_sequence_check(tp_mesh.size()))
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })


def _sequence_check(tp: int):
    """A forward pre-hook: sequence parallelism splits every sequence evenly over the TP ranks (gloo and NCCL
    collectives need equal shards), so a length TP does not divide is refused before any collective."""
    def check(module: nn.Module, args: tuple) -> None:
        seq = args[0].shape[1]
        if seq % tp:
            raise ParallelError(f"sequence length {seq} is not a multiple of the tensor parallel degree {tp} "
                                "(sequence parallelism splits it evenly)")
    return check


def apply_recompute(model: MiniCPM, recompute: Recompute) -> None:
    """2. Which part of every layer recomputes its activations in backward (model.RECOMPUTE)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    for layer in model.model.layers:
        layer.recompute = recompute


def apply_compile(model: MiniCPM) -> None:
    """3. torch.compile each decoder layer in place (parameter names unchanged): one graph reused by every
    layer, as torchtitan does."""
    for layer in model.model.layers:
        layer.compile(fullgraph=True)


@contextlib.contextmanager
def train_context(mesh: DeviceMesh):
    """Wrap forward, loss and backward: under TP the cross-entropy runs on vocab-sharded logits."""
    with loss_parallel() if mesh["tp"].size() > 1 else contextlib.nullcontext():
        yield


class GradSync:
    """4. Data parallelism: after backward, every gradient (each rank's TP shard) summed over mesh["dp"].
    Losses are token sums (model.loss_sum), so the caller divides by the global token count once."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None

    def __call__(self) -> None:
        if self.group is None:
            return
        for p in self.params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(g, group=self.group)


def local_batch(batch: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This DP rank's rows of a global batch (B, ...): contiguous equal slices; every TP rank of a group the same."""
    dp, rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    if batch.shape[0] % dp:
        raise ParallelError(f"batch of {batch.shape[0]} rows does not split over {dp} data-parallel ranks")
    return batch.chunk(dp)[rank]
