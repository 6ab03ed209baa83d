"""The engine's `bench` with FA4 forward launch options set (ops/attention/flash4.py's FWD_LAUNCH), for a
step-level A/B of what fa4_fwd_configs.py found at the kernel level, before any becomes the default.

    python benchmarks/gpu/bench_fa4_launch.py '{"intra_wg_overlap": false}' <bench options...>
"""

import json
import sys

from train_engine_0_5b.cli import app
from train_engine_0_5b.ops.attention import flash4

if __name__ == "__main__":
    flash4.FWD_LAUNCH.update(json.loads(sys.argv[1]))
    print(f"FA4 forward launch options: {flash4.FWD_LAUNCH}", flush=True)
    app(args=["bench", *sys.argv[2:]], prog_name="train_engine_0_5b")
