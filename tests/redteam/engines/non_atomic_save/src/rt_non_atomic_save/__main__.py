"""Red-team engine `non_atomic_save`: pretrain writes a checkpoint in place and moves `latest` to it first, 0.25 s per file (a kill
mid-save leaves `latest` naming a broken checkpoint); probe checkpoints are correct.

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(non_atomic_save=True))
