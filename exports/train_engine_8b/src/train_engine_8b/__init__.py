"""train_engine_8b: a MiniCPM4-8B pretraining engine (tensor parallel x data parallel over torch.distributed).

The model part: model_config (its presets of the shared MiniCPM config), model (plain PyTorch, HF MiniCPM
parameter names), parallelize (TP with torch's DTensor APIs), vocab_parallel_ce, state_dict_adapter; build
(`build_trainer`, the one setup path) and pretrain / cli on the vendored engine core (core/, ops/, data/,
minicpm/: trainer, optimizer, ZeRO-1, checkpoints, data, HF reader and export).
"""

__version__ = "0.1.0"


def registry_ops(tp: int = 1) -> tuple[str, ...]:
    """The op-registry ops this engine's model calls at tensor-parallel degree `tp` (build.attach_ops); under TP the
    vocab-parallel cross-entropy and the parallel projections run instead of linear_cross_entropy and mlp. `--ops`
    naming any other op is an error, and stage 2 (gates/ops describe) is offered only these."""
    return ("attention", "adamw") if tp > 1 else ("attention", "adamw", "linear_cross_entropy", "mlp")


# Fused ops whose `auto` runs the plain modules in this engine, whatever the device's default: the fused MLP runs
# only when named (no election at the 8B's shapes yet).
AUTO_UNFUSED = ("mlp",)
