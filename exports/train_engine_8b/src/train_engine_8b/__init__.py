"""train_engine_8b: a MiniCPM4-8B pretraining engine (tensor parallel x data parallel over torch.distributed).

Built so far, the model part: model_config (the typed MiniCPM4 config and its presets), model (plain
PyTorch, HF MiniCPM parameter names), parallelize (TP with torch's DTensor APIs, then DP), state_dict_adapter
(a TP model's DTensors -> one unsharded HF state dict). The trainer, data, checkpoints and CLI come from the
shared engine core (README.md).
"""

__version__ = "0.1.0"
