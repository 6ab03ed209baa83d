"""The package's vendored core (core/, ops/, data/, minicpm/) is the one its vendored_core.json stamps: an edit made
here instead of in the forge workspace's engine_core/ fails this test."""

from __future__ import annotations

from pathlib import Path

import train_engine_8b
from train_engine_8b.core import vendored


def test_vendored_core_matches_its_stamp():
    problems = vendored.drift(Path(train_engine_8b.__file__).parent)
    assert not problems, "\n".join(problems)
