"""Red-team engine `export_folds_probe_only`: export-hf folds the MiniCPM scales only for probe checkpoints; a pretrain checkpoint is exported
with raw weights.

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(export_folds_probe_only=True))
