"""The `torch` reference stack: eager PyTorch MiniCPM4 (model.py), optimizer math (optim.py), and its
answers to the probe contract (probes.py), run as `python -m gates.stacks.torch_ref probe ...`."""
