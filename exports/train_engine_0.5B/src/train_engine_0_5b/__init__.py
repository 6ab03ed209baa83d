"""train_engine_0_5b: a MiniCPM4-0.5B pretraining engine (data parallel; CPU with gloo, GPU with NCCL).

Entry point: `python -m train_engine_0_5b --help` (under torchrun for more than one process).
Layout: model_config (the model), config (the engine's typed config), ops/ (the op registry),
model (MiniCPM4 through the registry), dist + trainer (data-parallel steps), data/, checkpoint,
pretrain / bench / probe / export_hf (the commands), cli (their command line).
"""

__version__ = "0.1.0"
