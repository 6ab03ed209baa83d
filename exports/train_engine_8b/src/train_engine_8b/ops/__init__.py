"""The op registry (registry.py) and one folder per op: `<op>/reference.py` (plain PyTorch, runs on a
CPU) beside optimized implementations (`<op>/<impl>.py`). The model calls ops only through the
registry, so a config selects implementations without touching the model."""

# Custom ops register as "<engine package>::<op>", so two engines carrying this core never collide.
LIBRARY = __name__.split(".")[0]
