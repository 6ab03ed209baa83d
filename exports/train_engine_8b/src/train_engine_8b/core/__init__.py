"""The model-independent engine core: trainer, optimizer, data parallelism, checkpoints, metrics, config
sections and CLI scaffolding. Vendored from the forge workspace's engine_core/ (vendored.py); the model part
(model, model config, parallelize, HF adapter) lives beside it in the engine package and imports it, never
the other way."""
