"""Puts the engine's src/ on sys.path, so its tests run from an unpacked copy of the export alone."""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
