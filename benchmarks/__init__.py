"""Benchmarks: the named experiments (`python -m benchmarks` lists them: the side-by-side driver, the
torch-vs-megatron agreement report, the data pipeline, the results index and its archive), their per-stack
runners, GPU session scripts (gpu/) and the committed results (results/)."""
