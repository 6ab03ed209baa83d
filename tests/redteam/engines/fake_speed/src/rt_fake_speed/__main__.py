"""Red-team engine `fake_speed`: bench claims 1e12 tokens/s and 52 % MFU, pretrain's log claims 52 % MFU, and pretrain sleeps 50 ms
per step; its math is correct.

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(fake_speed=True))
