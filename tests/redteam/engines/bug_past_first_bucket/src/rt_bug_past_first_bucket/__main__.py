"""Red-team engine `bug_past_first_bucket`: pretrain under DP all-reduces only the first gradient bucket (--bucket-mb); probes are correct.

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(reduce_first_bucket_only=True))
