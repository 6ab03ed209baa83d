"""Red-team engine `residual_scale`: layer 1 scales its residual branches by scale_depth / L instead of scale_depth / sqrt(L).

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(residual_scale_layer=1))
