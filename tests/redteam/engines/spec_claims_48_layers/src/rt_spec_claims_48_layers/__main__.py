"""Red-team engine `spec_claims_48_layers`: the base engine, unchanged, except that its model_spec.toml [model]
claims 48 layers: MFU computed from the engine's file instead of the case's model would be inflated
by 48 / num_layers. See tests/redteam/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

main(Flaws())
