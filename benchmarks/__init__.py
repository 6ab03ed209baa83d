"""Benchmarks: the side-by-side driver (`python -m benchmarks.compare`), its per-stack runners, the
torch-vs-megatron agreement report (`python -m benchmarks.agreement`), GPU scripts (gpu/) and the
committed results (results/)."""
