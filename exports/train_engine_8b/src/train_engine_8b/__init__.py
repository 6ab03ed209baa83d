"""train_engine_8b: a MiniCPM4-8B pretraining engine (tensor parallel x data parallel over torch.distributed).

Built so far, the model part: model_config (its presets of the shared MiniCPM config), model (plain
PyTorch, HF MiniCPM parameter names), parallelize (TP with torch's DTensor APIs, then DP), state_dict_adapter
(a TP model's DTensors -> one unsharded HF state dict). Vendored from the shared engine core: core/, ops/,
data/ (trainer, ops, data, checkpoints; not wired in yet) and minicpm/ (config, RoPE tables, HF fold, init rule).
"""

__version__ = "0.1.0"
