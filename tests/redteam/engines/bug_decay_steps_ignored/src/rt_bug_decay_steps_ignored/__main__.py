"""Red-team engine `bug_decay_steps_ignored`: wsd ignores an explicit decay_steps (always decays over ceil(10 %) of the steps), probes and
pretrain.

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(wsd_ignores_decay_steps=True))
