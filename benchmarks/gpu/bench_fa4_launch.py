"""The engine's `bench` with FA4 forward launch values (attention=flash4's declared space, ops/table.py) set through a
tuned-config file for this machine, for a step-level A/B before any is elected.

    python benchmarks/gpu/bench_fa4_launch.py '{"fwd_intra_wg_overlap": false}' <bench options...>
"""

import json
import sys
import tempfile
from pathlib import Path

from train_engine_0_5b.cli import app
from train_engine_0_5b.ops import space
from train_engine_0_5b.ops.table import check_values

if __name__ == "__main__":
    values = check_values("attention", "flash4", json.loads(sys.argv[1]))
    space.TUNED_FILE = Path(tempfile.mkdtemp(prefix="fa4-launch-")) / "configs.json"
    space.write_tuned(space.TunedFile(entries=[space.TunedEntry(key=space.runtime_key("cuda"),
                                                                ops={"attention": {"flash4": values}})]))
    print(f"FA4 forward launch values: {values} (tuned file {space.TUNED_FILE})", flush=True)
    app(args=["bench", *sys.argv[2:]], prog_name="train_engine_0_5b")
