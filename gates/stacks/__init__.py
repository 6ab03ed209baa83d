"""Reference stacks: each answers the probe contract as a subprocess command.

STACKS maps a stack name to the argv prefix that runs it; a gate appends
`probe NAME --case DIR --out DIR`. An engine is a stack too: its command comes from its export.
"""

import sys

STACKS: dict[str, list[str]] = {
    "torch": [sys.executable, "-m", "gates.stacks.torch_ref"],
    # the same model with torch's fused attention: M5's speed check at long sequences (SPEED_STACKS)
    "torch-sdpa": [sys.executable, "-m", "gates.stacks.torch_ref", "--attention", "sdpa"],
    # megatron-core GPTModel, local (non-TE) spec: as shipped, and with core attention swapped to SDPA.
    "megatron": [sys.executable, "-m", "gates.stacks.megatron", "--attention", "unfused"],
    "megatron-sdpa": [sys.executable, "-m", "gates.stacks.megatron", "--attention", "sdpa"],
}

# The stack that checks M5's timed runs, per reference: fused attention (the timed runs are long sequences).
SPEED_STACKS: dict[str, str] = {"torch": "torch-sdpa", "megatron": "megatron-sdpa"}
