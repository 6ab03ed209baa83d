"""Red-team engine `lazy_ranks`: rank 0 computes every rank's rows and the other ranks add zero gradients,
so the summed gradient, the loss and the weights are right while only one process works.

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(lazy_ranks=True))
