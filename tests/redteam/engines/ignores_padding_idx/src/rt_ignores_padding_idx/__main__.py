"""Red-team engine `ignores_padding_idx`: the pad token's embedding row gets its lookup gradient (MiniCPM's
nn.Embedding has padding_idx = pad_token_id: that row gets none).

The base engine (../../base, a correct one) with one flaw switched on; see tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws(ignores_padding_idx=True))
