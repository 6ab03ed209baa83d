"""Red-team engine `ignores_rope_scaling`: plain RoPE whatever the config's rope_scaling (MiniCPM4's LongRoPE) says.

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(ignores_rope_scaling=True))
